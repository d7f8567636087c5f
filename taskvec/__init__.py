"""taskvec: task-vector arithmetic on language-model weights.

The heavy modules (torch, transformers) are imported by the submodules that need them, so that
`import taskvec` and the CLI start fast.
"""

__version__ = "0.1.0"

from taskvec.errors import TaskvecError

__all__ = ["TaskvecError", "__version__"]
