"""nerveseg's desktop side: data, model, loss, training loop, threshold tuning, evaluation and figures."""
