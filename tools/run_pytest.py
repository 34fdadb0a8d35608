"""Entry point of the Bazel py_test targets: runs pytest on one test file.

Bazel runs the fast subset: tests marked `slow` are left to `make test`.
"""

import os
import sys

import pytest

if __name__ == "__main__":
    test_file = os.path.realpath(sys.argv[1])
    repo = os.path.dirname(os.path.dirname(test_file))
    os.chdir(repo)
    sys.path.insert(0, repo)
    sys.exit(pytest.main(["-q", "-rs", "-m", "not slow", "-p", "no:cacheprovider",
                          "-c", os.path.join(repo, "pytest.ini"), test_file]))
