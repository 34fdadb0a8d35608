"""The model's versions, TF Serving's way: `DIR/<integer>/` SavedModels under a base path,
polled; a new version is loaded and warmed (its programs compiled) before it takes
traffic, requests switch to it at once, requests already on the old version finish there,
and then the old one is unloaded. A version that fails to load is reported with its error
and never takes traffic. One directory (`--saved_model`) is version 1, never polled.

States, as TF Serving names them: LOADING, AVAILABLE, UNLOADING, END (unloaded, or failed
to load: then with its error).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Callable, Dict, List, Optional

from pipeline.serving import quality as floors
from pipeline.serving.protocol import RequestError

POLICIES = ("latest", "all", "specific")


def parse_policy(text: str) -> tuple:
    """"latest", "all" or "specific:N,M" -> (kind, frozenset of versions)."""
    kind, _, numbers = text.partition(":")
    if kind not in POLICIES or (kind == "specific") != bool(numbers):
        raise ValueError(f"model_version_policy={text!r}, expected 'latest', 'all' or "
                         "'specific:N[,M...]'")
    try:
        wanted = frozenset(int(n) for n in numbers.split(",")) if numbers else frozenset()
    except ValueError:
        raise ValueError(f"model_version_policy={text!r}: versions are integers") from None
    return kind, wanted


def parse_labels(text: str) -> Dict[str, int]:
    """"stable=3,canary=4" -> {"stable": 3, "canary": 4}."""
    labels = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, number = part.partition("=")
        if not name or not number.isdigit() or not name.replace("_", "").replace("-", "") \
                .isalnum():
            raise ValueError(f"version_labels entry {part!r}, expected label=VERSION (a "
                             "name of letters, digits, '_' or '-', and an integer)")
        labels[name] = int(number)
    return labels


def version_dirs(base: str) -> Dict[int, str]:
    """{version: path} of the base path's integer-named subdirectories."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(base):
        return {}
    return {int(name.rstrip("/")): os.path.join(base, name.rstrip("/"))
            for name in tf.io.gfile.listdir(base)
            if name.rstrip("/").isdigit() and tf.io.gfile.isdir(os.path.join(base, name))}


@dataclasses.dataclass(eq=False)
class Version:
    number: int
    path: str
    state: str = "LOADING"
    error: str = ""
    model: object = None
    engine: object = None
    specs: Optional[dict] = None
    metadata: Optional[dict] = None
    signature_defs: Optional[dict] = None
    in_flight: int = 0

    async def run(self, job, quality=None):
        """Submits a job to this version's engine and returns its body (raising what it
        ended with); the version is not unloaded while the job is in flight."""
        self.in_flight += 1
        try:
            floors.submit(self.engine, job, self.model.profile, quality)
            result = await job.done
        finally:
            self.in_flight -= 1
        if isinstance(result, Exception):
            raise result
        return result

    def status(self) -> dict:
        ok = not self.error
        return {"version": str(self.number), "state": self.state,
                "status": {"error_code": "OK" if ok else "UNKNOWN",
                           "error_message": self.error}}


class Versions:
    """Loads, serves and unloads versions. `load(version)` (async) loads its model, makes
    and warms its engine; `unload(version)` (async) stops them. The server supplies both."""

    def __init__(self, base_path: Optional[str], saved_model: Optional[str], policy: str,
                 labels: Dict[str, int], load: Callable, unload: Callable, log: Callable):
        self.base_path, self.saved_model = base_path, saved_model
        self.policy = parse_policy(policy)
        self.labels = labels
        self.load, self.unload, self.log = load, unload, log
        self.versions: Dict[int, Version] = {}
        self.failed: Dict[int, float] = {}  # Version -> its directory's time when it failed.
        self.busy = asyncio.Lock()

    # -- which versions

    def _wanted(self, found: Dict[int, str]) -> List[int]:
        kind, numbers = self.policy
        candidates = sorted(v for v in found if v not in self.failed)
        if kind == "all":
            return candidates
        if kind == "specific":
            return [v for v in candidates if v in numbers]
        return candidates[-1:]

    def available(self) -> List[Version]:
        return [v for v in self.versions.values() if v.state == "AVAILABLE"]

    def resolve(self, version: Optional[str] = None, label: Optional[str] = None) -> Version:
        """The version a request names (by number or label; neither: the highest
        available), or RequestError 404 as TF Serving answers it."""
        if label is not None:
            if label not in self.labels:
                raise RequestError(f"Unrecognized servable version label: {label}", 404)
            version = str(self.labels[label])
        if version is not None:
            found = self.versions.get(int(version))
            if found is None or found.state != "AVAILABLE":
                state = f" (it is {found.state})" if found is not None else ""
                raise RequestError(f"Servable not found for request: Specific(version "
                                   f"{version}){state}", 404)
            return found
        available = self.available()
        if not available:
            raise RequestError("no version of the model is available yet", 503,
                               {"Retry-After": "1"})
        return max(available, key=lambda v: v.number)

    def statuses(self, version: Optional[str] = None, label: Optional[str] = None) -> list:
        if label is not None or version is not None:
            if label is not None and label not in self.labels:
                raise RequestError(f"Unrecognized servable version label: {label}", 404)
            number = self.labels[label] if label is not None else int(version)
            if number not in self.versions:
                raise RequestError(f"Could not find version {number} of the model", 404)
            return [self.versions[number].status()]
        return [v.status() for _, v in sorted(self.versions.items())]

    # -- polling

    async def refresh(self) -> None:
        """One poll: loads wanted versions not loaded, then unloads versions no longer
        wanted once a wanted one is available."""
        async with self.busy:
            found = ({1: self.saved_model} if self.saved_model
                     else await asyncio.to_thread(version_dirs, self.base_path))
            for number, mtime in list(self.failed.items()):  # A rewritten version retries.
                if number in found and _mtime(found[number]) != mtime:
                    del self.failed[number]
            for number in self._wanted(found):
                if number not in self.versions or self.versions[number].state == "END":
                    await self._load(Version(number, found[number]))
            wanted = self._wanted(found)  # Without the versions that just failed.
            if not self.available():
                return
            for version in list(self.versions.values()):
                if version.number not in wanted and version.state == "AVAILABLE":
                    await self._unload(version)

    async def _load(self, version: Version) -> None:
        self.versions[version.number] = version
        self.log(f"version {version.number}: loading {version.path}")
        start = time.monotonic()
        try:
            await self.load(version)
        except Exception as e:  # Any failure: reported, never takes traffic.
            version.state, version.error = "END", f"{type(e).__name__}: {e}"
            self.failed[version.number] = _mtime(version.path)
            self.log(f"version {version.number}: failed to load, not served: {version.error}")
            return
        version.state = "AVAILABLE"
        self.log(f"version {version.number}: AVAILABLE after {time.monotonic() - start:.1f} s")

    async def _unload(self, version: Version, wait_s: float = 30.0) -> None:
        version.state = "UNLOADING"
        self.log(f"version {version.number}: UNLOADING once its {version.in_flight} "
                 "request(s) in flight finish")
        give_up = time.monotonic() + wait_s
        while (version.in_flight or version.engine.busy()) and time.monotonic() < give_up:
            await asyncio.sleep(0.02)
        await self.unload(version)
        version.state, version.model, version.engine = "END", None, None
        self.log(f"version {version.number}: END")

    async def poll(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh()
            except Exception as e:  # A listing error: keep serving, try again.
                self.log(f"polling {self.base_path} failed: {type(e).__name__}: {e}")


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
