"""Encoders (HSTU, SASRec) and the embedding/input/output modules they share."""
