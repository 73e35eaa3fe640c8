"""Guidance rules and inverse-problem tools; ``operators`` holds the measurement operators shared with FlowChef."""
