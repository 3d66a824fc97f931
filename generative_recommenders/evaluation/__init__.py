"""Evaluation of the tasks' models: retrieval.py (rank metrics over all candidates), ranking.py (generative
ranking's candidates), metrics.py (AUC, NE, RMSE, NDCG), baselines.py (item-mean, user+item bias),
next_item_baselines/ (most-popular; SR, AR and V-SKNN on sessions), scored by retrieval.py's evaluator."""
