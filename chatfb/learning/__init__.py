"""The learning cycle: feedback to training data, training, gating, exports and the Hub."""
