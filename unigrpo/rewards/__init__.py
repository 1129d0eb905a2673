"""Rewards and advantages: black-box scorers of generated images and the group-normalised advantages
(ALGORITHM.md §5)."""
