"""What ``bench serve`` runs: its settings, checked, and the prompts it sends by default."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medusa_forge.errors import ForgeError

DEFAULT_PROMPTS = (
    "def fibonacci(n):",
    "import numpy as np\n\ndef normalize(x):",
    "class Stack:\n    def __init__(self):",
    "def read_json(path):\n    with open(path) as f:",
    "import torch\n\nclass MLP(torch.nn.Module):",
    "def quicksort(items):",
    "import pandas as pd\n\ndf = pd.read_csv(",
    "def is_prime(n: int) -> bool:",
)
MODEL = "bench"


@dataclass
class ServeBenchConfig:
    engine: Path  # native engine dir, or HF model dir (built into a native engine first)
    medusa: Path | None = None  # heads for a HF model dir
    tree: str | None = None  # choice tree for the build (default: build native's)
    dtype: str | None = None  # build dtype (default: float32 on CPU, bfloat16 on CUDA)
    use_medusa: bool | None = None  # None: Medusa when the engine has heads
    clients: int = 32
    requests: int = 10  # per client
    max_tokens: int = 16
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    stream: bool | None = None  # load requests stream (one response per step); None: the mode's default
    keep_stream: bool = False  # load clients keep one gRPC stream open (default: one per request, as `query`)
    overhead_trials: int = 30
    warmup: int = 3
    timeout_s: float = 120.0  # per request
    time_limit_s: float = 600.0  # the whole load phase
    instances: int = 1
    max_batch_size: int | None = None  # request slots decoded together (1: serial); None: the engine's
    torch_threads: int | None = None  # None: this process's torch thread count, for server and baseline alike
    goal_overhead_ms: float = 2.0
    workdir: Path | None = None  # keep engine/repo/log here (default: a temporary directory)

    def check(self) -> None:
        if self.clients < 1 or self.requests < 1 or self.max_tokens < 1:
            raise ForgeError("--clients, --requests and --max-tokens must be >= 1")
        if self.overhead_trials < 1 or self.warmup < 0:
            raise ForgeError("--overhead-trials must be >= 1 and --warmup >= 0")
        if self.timeout_s <= 0 or self.time_limit_s <= 0:
            raise ForgeError("--timeout and --time-limit must be > 0")
        if not self.prompts or not all(self.prompts):
            raise ForgeError("give at least one non-empty prompt")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ForgeError(f"--max-batch-size must be >= 1 (1: serial), got {self.max_batch_size}")
