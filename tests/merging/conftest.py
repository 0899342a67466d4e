import os

# A missing open_clip / Hugging Face weight must fail at once instead of retrying for a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
