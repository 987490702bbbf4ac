"""The embeddable guard: what a chat/agent server calls instead of its own save.

``Guard.save`` is an atomic save (tmp + fsync + rename + directory fsync)
that keeps the prior version before any shrinking write, refuses to save a
document that was loaded metadata-only, and refreshes the session's pin so a
later shrink by *any* writer is caught. ``recover_on_startup`` heals
unintended wipes and never reverts an intended shrink.

Imports only the store, the counter and the standard library (plus orjson):
a server embeds this without watchdog, structlog or systemd.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import fsutil
from .count import DEFAULT_MAX_BYTES, CountSpec, Parsed, count_doc, parse, stat_key
from .store import (
    STORE_DIRNAME,
    Pin,
    RestoreResult,
    Retention,
    is_loss,
    loss_reason,
    Store,
    Version,
    validate_sid,
)

log = logging.getLogger("sessionguard")


class PartialSessionError(RuntimeError):
    """Refused: the document was loaded with ``metadata_only=True``.

    Saving it would replace the whole conversation with its metadata — the
    bug this project exists to stop. Load the full session and save that.
    """


class UnsafeSessionFile(OSError):
    """The session path is a symlink, FIFO, device or directory: refused, not followed."""


class CorruptSessionError(ValueError):
    """The session file exists but cannot be parsed (``.parsed.error`` says why)."""

    def __init__(self, sid: str, parsed: Parsed) -> None:
        super().__init__(f"session {sid!r} is unparseable: {parsed.error}")
        self.parsed = parsed


class PartialDocument(dict):  # type: ignore[type-arg]
    """A session's metadata without its messages, as returned by
    ``Guard.load(sid, metadata_only=True)``. ``Guard.save`` refuses it, even if
    a ``messages`` key was added back to it afterwards."""


@dataclass(frozen=True)
class Recovered:
    sid: str
    version: Version
    count_before: int | None


@dataclass(frozen=True)
class LeftAlone:
    sid: str
    why: str


@dataclass
class RecoveryReport:
    """What ``recover_on_startup`` did: sessions restored, and sessions left alone with why."""

    restored: list[Recovered] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)


class Guard:
    """Guarded load/save/restore for one session directory.

    ``count`` says where the messages are: a top-level key (default
    ``messages``), a JSON pointer (``/data/messages``) or ``jsonl``.
    Session ``<sid>`` lives in ``<session_dir>/<sid><suffix>``; the store
    defaults to ``<session_dir>/.sessionguard`` (same filesystem, so the
    library's versions and pins are hard links: no bytes copied).
    """

    def __init__(
        self,
        session_dir: str | os.PathLike[str],
        count: str = "messages",
        *,
        store: str | os.PathLike[str] | None = None,
        suffix: str | None = None,
        retention: Retention | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        indent: bool = True,
    ) -> None:
        self.session_dir = os.path.abspath(os.fspath(session_dir))
        self.spec = CountSpec.parse(count)
        self.suffix = suffix if suffix is not None else (".jsonl" if self.spec.kind == "jsonl" else ".json")
        self.max_bytes = max_bytes
        self._dump_opts = orjson.OPT_INDENT_2 if indent else 0
        self.store = Store(
            store if store is not None else os.path.join(self.session_dir, STORE_DIRNAME),
            retention=retention,
            max_bytes=max_bytes,
        )

    # -- paths ---------------------------------------------------------------

    def path(self, sid: str) -> str:
        return os.path.join(self.session_dir, validate_sid(sid) + self.suffix)

    def _lstat(self, path: str) -> os.stat_result | None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeSessionFile(f"{path} is not a regular file (symlinks are never followed)")
        return st

    # -- load ----------------------------------------------------------------

    def load(self, sid: str, *, metadata_only: bool = False) -> dict[str, Any]:
        """The session's document; with *metadata_only*, everything but the messages.

        A metadata-only document is a :class:`PartialDocument`, which
        :meth:`save` refuses. Raises ``FileNotFoundError``,
        :class:`UnsafeSessionFile` or :class:`CorruptSessionError`.
        """
        path = self.path(sid)
        try:
            data, _ = fsutil.read_regular(path, self.max_bytes)
        except fsutil.NotRegularFile as exc:
            raise UnsafeSessionFile(str(exc)) from exc
        except OSError as exc:
            if exc.errno == 40:  # ELOOP: O_NOFOLLOW met a symlink
                raise UnsafeSessionFile(f"{path} is a symlink: refused, not followed") from exc
            raise
        parsed = parse(data, self.spec)
        if not parsed.ok:
            raise CorruptSessionError(sid, parsed)
        if self.spec.kind == "jsonl":
            if metadata_only:
                raise ValueError("a jsonl session has no metadata apart from its messages")
            return parsed.messages  # type: ignore[return-value]
        if not metadata_only:
            return parsed.doc  # type: ignore[no-any-return]
        return PartialDocument(_without_messages(parsed.doc, self.spec.path))

    # -- save ----------------------------------------------------------------

    def save(self, sid: str, doc: Any, *, allow_shrink: bool = False, reason: str | None = None) -> Version | None:
        """Atomically write *doc* as the session, keeping the prior version first
        if this write loses messages.

        With ``allow_shrink=False`` a shrinking save still happens (the server
        stays in charge) but the prior version is kept as ``shrink`` and a
        warning is logged; with ``allow_shrink=True`` it is kept as
        ``intended`` and logged at info with *reason*. Returns the version
        kept, or None. Raises :class:`PartialSessionError` for a metadata-only
        document before touching the disk.
        """
        if isinstance(doc, PartialDocument):
            raise PartialSessionError(
                f"refusing to save session {sid!r}: it was loaded with metadata_only=True, "
                "so saving it would drop its messages; load the full session first"
            )
        path = self.path(sid)
        new_count = count_doc(doc, self.spec)
        data = self._serialize(doc)
        with self.store.lock(sid):
            live = self._lstat(path)
            pin = self.store.pin(sid, tidy=True)
            kept = self._keep_prior(sid, path, live, pin, new_count, allow_shrink, reason)
            st = fsutil.atomic_write(path, data, like=live)
            self._pin_written(sid, None if live is None else pin, path, st, new_count)
            if kept is not None:
                self.store.apply_retention(sid)
        return kept

    def _serialize(self, doc: Any) -> bytes:
        if self.spec.kind == "jsonl":
            return b"".join(orjson.dumps(m) + b"\n" for m in doc)
        return orjson.dumps(doc, option=self._dump_opts)

    def _keep_prior(self, sid: str, path: str, live: os.stat_result | None, pin: Pin | None, new_count: int,
                    allow_shrink: bool, reason: str | None) -> Version | None:
        """Before replacing *path*: if the write loses messages, keep what it replaces.

        The count of the file being replaced comes from the pin when the
        file's identity ``(dev, ino, size, mtime_ns)`` matches it — no read,
        no parse on the hot path. Otherwise the file changed behind the
        guard's back: it is read once, and if that foreign write itself lost
        messages relative to the pin, the pin is kept first. Keeping a version
        leaves the pin in place; a deleted file's pin is dropped.
        """
        if live is None:
            if pin is not None:
                if pin.count:
                    self._keep_pin(sid, "deleted", None, pin.count)
                self.store.drop_pin(sid)
            return None
        if pin is not None and pin.key == stat_key(live):
            if not is_loss(pin.count, new_count):
                return None
            return self._keep_pin(sid, "intended" if allow_shrink else "shrink", reason, pin.count, new_count)
        fd, st = fsutil.open_regular(path)
        try:
            prior = parse(fsutil.read_fd(fd, st, self.max_bytes, path), self.spec)
            if pin is not None and (is_loss(pin.count, prior.count) or self.store.overtaken(pin, prior, self.spec)):
                self._keep_pin(sid, loss_reason(prior.count), None, pin.count, prior.count)
            if not is_loss(prior.count, new_count):
                return None
            why = "intended" if allow_shrink else "shrink"
            # The save below replaces this file by rename, so its inode can be
            # kept as the version with a hard link: no bytes copied.
            version = self.store.keep_fd(sid, fd, path, st, prior.count, why, "library", link=True)  # type: ignore[arg-type]
        finally:
            os.close(fd)
        _log_shrink(sid, why, reason, prior.count, new_count, version)
        return version

    def _keep_pin(self, sid: str, why: str, reason: str | None, before: int | None,
                  after: int | None = None) -> Version | None:
        version = self.store.keep_pin(sid, why, "library")  # type: ignore[arg-type]
        _log_shrink(sid, why, reason, before, after, version)
        return version

    def _pin_written(self, sid: str, old: Pin | None, path: str, st: os.stat_result, count: int) -> None:
        """Pin the file just written: a hard link, no bytes copied.

        The file was fsynced by the save and any version this save needed
        was made durable before it, so the pin skips both fsyncs: after a
        crash the previous pin name may survive instead, and it still holds
        the prior version. If another writer replaced the file in the
        microseconds since our rename, the pin is left as it was: the next
        save or the daemon learns the newer file.
        """
        try:
            fd, now = fsutil.open_regular(path)
        except (FileNotFoundError, UnsafeSessionFile, fsutil.NotRegularFile):
            return
        try:
            if now.st_ino == st.st_ino and now.st_dev == st.st_dev:
                self.store.set_pin(sid, old, fd, path, now, count, policy="link", durable=False, synced=True)
        finally:
            os.close(fd)

    # -- versions and restore ------------------------------------------------

    def versions(self, sid: str) -> list[Version]:
        """Kept versions of *sid*, oldest first."""
        return self.store.versions(validate_sid(sid))

    def restore(self, sid: str, version: str | None = None, *, dry_run: bool = False) -> RestoreResult:
        """Put a version back (None: the best — most messages, then newest).

        The current file is kept as a ``pre-restore`` version first, so the
        restore itself can be undone with another ``restore``.
        """
        result = self.store.restore(sid, self.path(sid), version, spec=self.spec, source="library",
                                    dry_run=dry_run)
        if not dry_run and not result.unchanged:
            log.warning("session.restored sid=%s version=%s count=%s", sid, result.restored.id,
                        result.restored.count, extra={"sg_event": "session.restored", "sid": sid})
        return result

    # -- start-up recovery ---------------------------------------------------

    def recover_on_startup(self) -> RecoveryReport:
        """Restore sessions emptied or corrupted by an *unintended* write.

        A session is restored when its live file has zero messages or is
        unparseable and that state was not recorded as intended: either a
        foreign write replaced the pinned file (the guard never saw it), or
        the guard's own last save kept a ``shrink``/``unparseable`` version.
        An intended shrink (``allow_shrink=True``, e.g. a user's undo or
        clear) is never reverted, and a non-empty session is never touched.
        One bad file never stops the others: each is handled on its own.
        """
        report = RecoveryReport()
        self.store.sweep_tmp()
        self.store.sweep_tmp(self.session_dir)
        for sid in self._all_sids():
            try:
                with self.store.lock(sid):
                    self._recover_one(sid, report)
            except Exception as exc:  # noqa: BLE001 - one session must not stop the rest
                report.left_alone.append(LeftAlone(sid, f"error: {exc}"))
                log.error("recovery.failed sid=%s error=%s", sid, exc,
                          extra={"sg_event": "recovery.failed", "sid": sid})
        return report

    def _all_sids(self) -> list[str]:
        sids = set(self.store.sessions())
        with os.scandir(self.session_dir) as it:
            for entry in it:
                name = entry.name
                if name.endswith(self.suffix) and not name.startswith(("_", ".")):
                    sids.add(name[: -len(self.suffix)])
        valid = []
        for sid in sorted(sids):
            try:
                valid.append(validate_sid(sid))
            except ValueError:
                continue
        return valid

    def _recover_one(self, sid: str, report: RecoveryReport) -> None:
        path = self.path(sid)
        pin = self.store.pin(sid, tidy=True)
        try:
            fd, st = fsutil.open_regular(path)
        except FileNotFoundError:
            report.left_alone.append(LeftAlone(sid, "no live file (deletion is not undone automatically)"))
            return
        except (fsutil.NotRegularFile, OSError) as exc:
            report.left_alone.append(LeftAlone(sid, f"not a regular file: {exc}"))
            return
        try:
            live = parse(fsutil.read_fd(fd, st, self.max_bytes, path), self.spec)
            foreign = pin is None or pin.key != stat_key(st)
            if foreign and pin is not None and is_loss(pin.count, live.count):
                # Someone replaced the pinned file without the guard: keep the pin first.
                self._keep_pin(sid, loss_reason(live.count), None, pin.count, live.count)
            if live.ok and live.count:
                if foreign:
                    self.store.set_pin(sid, pin, fd, path, st, live.count, policy="link")
                report.left_alone.append(LeftAlone(sid, f"has {live.count} messages"))
                return
        finally:
            os.close(fd)
        candidate, why = self._recovery_candidate(sid, foreign)
        if candidate is None:
            report.left_alone.append(LeftAlone(sid, why))
            return
        self.store.restore(sid, path, candidate.id, spec=self.spec, source="library")
        report.restored.append(Recovered(sid, candidate, live.count))
        log.warning("session.recovered sid=%s version=%s count=%s", sid, candidate.id, candidate.count,
                    extra={"sg_event": "session.recovered", "sid": sid})

    def _recovery_candidate(self, sid: str, foreign: bool) -> tuple[Version | None, str]:
        """The version to restore a wiped session from, or None and why not.

        Candidates are versions kept at unintended losses since the last
        intended shrink; the one with the most messages (then the newest) wins.
        """
        versions = self.store.versions(sid)
        if not versions:
            return None, "wiped, but no version was ever kept"
        newest = versions[-1]
        if not foreign and newest.reason == "intended":
            return None, "emptied by an intended shrink"
        if not foreign and newest.reason not in ("shrink", "unparseable"):
            return None, f"last change was a {newest.reason} version, not a wipe"
        last_intended = max((v.created for v in versions if v.reason == "intended"), default=float("-inf"))
        candidates = [
            v for v in versions
            if v.created > last_intended and v.reason in ("shrink", "unparseable", "deleted") and v.count
        ]
        if not candidates:
            return None, "no version with messages since the last intended shrink"
        return max(candidates, key=lambda v: (v.count, v.created)), ""


def _without_messages(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """A copy of *doc* minus the messages at *path* (copies only the dicts on the way)."""
    out = dict(doc)
    node = out
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            return out
        node[part] = dict(child)
        node = node[part]
    node.pop(path[-1], None)
    return out


def _log_shrink(sid: str, why: str, reason: str | None, before: int | None, after: int | None,
                version: Version | None) -> None:
    level = logging.INFO if why == "intended" else logging.WARNING
    log.log(level, "session.shrunk sid=%s reason=%s before=%s after=%s kept=%s note=%s", sid, why, before, after,
            version.id if version else None, reason or "",
            extra={"sg_event": "session.shrunk", "sid": sid, "reason": why})
