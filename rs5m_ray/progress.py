"""Progress of a loop that runs in Ray workers, drawn on the driver's terminal (stderr) as tqdm
bars, one per epoch. The loop reports to a named board actor (fire and forget: it never waits
for the driver); a driver thread reads the board twice a second. Works the same on a cluster,
where worker output does not reach the driver.
"""
from __future__ import annotations

import threading
from functools import cache

import ray

POLL_S = 0.5


@ray.remote(num_cpus=0)
class _Board:
    def __init__(self):
        self.state: dict = {}

    def update(self, state: dict) -> None:
        self.state.update(state)

    def read(self) -> dict:
        return self.state


def board_name(job: str) -> str:
    return f"rs5m-progress-{job}"


@cache
def _board(job: str):
    try:
        return ray.get_actor(board_name(job))
    except ValueError:  # no driver is drawing (a loop run on its own): report nowhere
        return None


def report(job: str, **state) -> None:
    """From the loop: `step` (done, over the run), `steps_per_epoch`, `total_steps`, and any figures to show."""
    board = _board(job)
    if board is not None:
        board.update.remote(state)


class EpochProgress:
    """On the driver, around the call that runs the loop: `with EpochProgress("train-clip-<name>"): fit()`."""

    def __init__(self, job: str, unit: str = "step"):
        self.job, self.unit = job, unit
        self.stop = threading.Event()

    def __enter__(self) -> "EpochProgress":
        self.board = _Board.options(name=board_name(self.job), get_if_exists=True).remote()
        self.thread = threading.Thread(target=self._draw, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        ray.kill(self.board)

    def _draw(self) -> None:
        from tqdm import tqdm

        bar, epoch = None, None
        while True:
            last = self.stop.wait(POLL_S)
            try:
                state = ray.get(self.board.read.remote(), timeout=10)
            except Exception:  # the board is gone (shutdown): nothing more to draw
                break
            if "step" in state:
                per_epoch = state["steps_per_epoch"]
                now = (state["step"] - 1) // per_epoch + 1
                if now != epoch:
                    if bar is not None:
                        bar.update(bar.total - bar.n)
                        bar.close()
                    epoch = now
                    epochs = -(-state["total_steps"] // per_epoch)
                    bar = tqdm(total=per_epoch, desc=f"epoch {epoch}/{epochs}", unit=self.unit, leave=True)
                bar.update(state["step"] - (epoch - 1) * per_epoch - bar.n)
                bar.set_postfix({k: f"{v:.4g}" for k, v in state.items()
                                 if k not in ("step", "steps_per_epoch", "total_steps")}, refresh=False)
            if last:
                break
        if bar is not None:
            bar.close()
