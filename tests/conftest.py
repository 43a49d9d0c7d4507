import os
import sys

# OpenMP threads that busy-wait make tiny models 100x slower when the cores are shared with other
# processes; passive waiting costs nothing measurable on an idle machine. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Tests import the scripts (`import ppo`) and `common` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
