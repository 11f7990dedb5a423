"""Counters and histograms for ``GET /metrics`` in Prometheus' text format."""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Cumulative-bucket histogram of seconds."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        total = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """What the server has done so far; ``render`` adds the engine's current state.

    Tokens per second cover the last ``window_s`` seconds of ``clock``: only the generations
    finished in that window are kept, whether or not ``/metrics`` is read.
    """

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.Lock()
        self.responses: Counter[str] = Counter()  # by HTTP status
        self.rejected = 0  # 429s for a full queue
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram()
        self.latency = Histogram()
        self.window_s = window_s
        self.clock = clock
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) finished in the window

    def finished(self, prompt_tokens: int, completion_tokens: int, ttft_s: float | None, latency_s: float) -> None:
        """Record one finished generation (one choice)."""
        now = self.clock()
        with self.lock:
            self._forget_before(now - self.window_s)
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            self.latency.observe(latency_s)
            self._recent.append((now, completion_tokens))

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``window_s`` seconds."""
        cutoff = self.clock() - self.window_s
        with self.lock:
            self._forget_before(cutoff)
            return sum(n for _, n in self._recent) / self.window_s

    def _forget_before(self, cutoff: float) -> None:
        """Drop the finished generations older than ``cutoff`` (the caller holds the lock)."""
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()

    def render(self, queue_depth: int, running: int, in_flight: int) -> str:
        lines = [
            "# HELP qwen_vl_queue_depth Requests waiting for an engine row.",
            "# TYPE qwen_vl_queue_depth gauge",
            f"qwen_vl_queue_depth {queue_depth}",
            "# HELP qwen_vl_running_requests Requests generating now.",
            "# TYPE qwen_vl_running_requests gauge",
            f"qwen_vl_running_requests {running}",
            "# HELP qwen_vl_in_flight_requests Generations accepted and not yet answered.",
            "# TYPE qwen_vl_in_flight_requests gauge",
            f"qwen_vl_in_flight_requests {in_flight}",
            "# HELP qwen_vl_tokens_per_second Generated tokens per second over the last window.",
            "# TYPE qwen_vl_tokens_per_second gauge",
            f"qwen_vl_tokens_per_second {self.tokens_per_second():.3f}",
            "# HELP qwen_vl_prompt_tokens_total Prompt tokens of finished generations.",
            "# TYPE qwen_vl_prompt_tokens_total counter",
            f"qwen_vl_prompt_tokens_total {self.prompt_tokens}",
            "# HELP qwen_vl_generated_tokens_total Generated tokens of finished generations.",
            "# TYPE qwen_vl_generated_tokens_total counter",
            f"qwen_vl_generated_tokens_total {self.completion_tokens}",
            "# HELP qwen_vl_rejected_total Requests refused with 429 because the queue was full.",
            "# TYPE qwen_vl_rejected_total counter",
            f"qwen_vl_rejected_total {self.rejected}",
            "# HELP qwen_vl_responses_total Answers by HTTP status.",
            "# TYPE qwen_vl_responses_total counter",
        ]
        with self.lock:
            lines += [f'qwen_vl_responses_total{{status="{s}"}} {n}' for s, n in sorted(self.responses.items())]
            lines += self.ttft.lines("qwen_vl_time_to_first_token_seconds", "Time from submission to the first token.")
            lines += self.latency.lines("qwen_vl_request_latency_seconds", "Time from submission to the last token.")
        return "\n".join(lines) + "\n"
