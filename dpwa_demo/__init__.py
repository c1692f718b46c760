"""``dpwa demo``: several local nodes learn scikit-learn's digits together by gossip."""
