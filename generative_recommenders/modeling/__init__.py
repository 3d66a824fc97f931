"""Models: the encoders (HSTU, SASRec, GRU4Rec, BERT4Rec), the item table, input and output they share, ranking."""
