"""From a model to numbers: batched prediction, threshold tuning (equation 4), test evaluation, bootstrap intervals."""
