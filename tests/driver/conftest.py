"""Session fixtures of the part-1 driver tests (the helpers live in nrrdd_tiny.py)."""
from nrrdd_tiny import folder_dir, idx_dir, teacher_path  # noqa: F401
