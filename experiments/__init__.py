"""The paper's experiments (installed as `unigrpo_experiments`): `unigrpo compare` runs every baseline of
ALGORITHM.md §11 × seeds on the shapes world and writes results.md. Research tooling, apart from the trainer
library: it uses unigrpo, and nothing in unigrpo uses it."""
