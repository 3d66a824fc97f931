"""Readers of each raw data source: MovieLens, Amazon Books, session click logs."""
