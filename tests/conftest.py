import os
import sys

# Shared problem definitions live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))
