"""Import the package from this checkout, whatever ``pip install -e`` last pointed at."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
