"""Shared test settings: the unit tests run offline, like the notebooks in the test run."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
