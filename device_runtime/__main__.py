"""`python -m device_runtime ...` is `nerveseg-device ...`."""

import sys

from .cli import main

sys.exit(main())
