"""Runnable examples behind the ``fastrnn`` command: a character-level LSTM (``char_rnn``) and a
small CNN on scikit-learn's bundled 8x8 digits (``digits``). No downloads."""
