import os
import sys
from pathlib import Path

# Everything runs offline: the text encoder and the tiny models load from the repo and site-packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as tiny_transformers
