"""HSTU generative recommender: a reproduction of "Actions Speak Louder than Words" (ICML'24)."""
