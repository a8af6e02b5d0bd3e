import os
import sys

# tests/ holds helper modules (broken caches) that tests name as module:attr.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
