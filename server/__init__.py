"""The aggregator side (federated learning strategies; see later issues)."""
