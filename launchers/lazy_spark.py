"""The SparkSession of a Spark kernel, built behind its first cells (``metadata.egd.config.spark_session: lazy``).

egd's launcher runs this file in the kernel (an IPython ``exec_files`` startup file calls :func:`install`) when the
kernel is a Spark driver. Standard library only at import; pyspark is imported by the build thread.

- ``lazy``: a thread builds the SparkSession while the kernel already answers; ``spark`` and ``sc`` are proxies
  from the first cell. The first use of either waits for the build, printing progress into that cell's output
  (on stderr: the YARN application and its state, executors registered), then forwards to the real object;
  after the first cell that follows the build, ``spark`` and ``sc`` in the user namespace are the real objects.
  A failed build is an error (:class:`SparkSessionUnavailable`) on every use, carrying Spark's message and YARN's
  diagnostics; the kernel stays up. An interrupt during the wait returns control; the build goes on.
- ``eager``: the session is built before the kernel answers (:func:`install` returns when it exists).
- ``none``: nothing is built.

A proxy is not a ``SparkSession``/``SparkContext`` for ``isinstance`` and ``is`` until it has been replaced;
before the session exists its ``repr()``/``str()`` say so instead of waiting (variable inspectors and the
debugger call them), and the names completion and inspection probe are missing rather than waited for.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import warnings
from typing import Any

MODES = ("lazy", "eager", "none")
#: Seconds between two progress lines while a cell waits for the session.
PROGRESS_EVERY = 3.0
#: How often the waiting loop wakes up (an interrupt is taken at once anyway; this bounds the progress delay).
WAIT_STEP = 0.25
#: Seconds a progress line may spend asking the ResourceManager about the application.
RM_TIMEOUT = 2.0

_CONTAINER = re.compile(r"^container_(?:e\d+_)?(\d+)_(\d+)_\d+_\d+$")


class SparkSessionUnavailable(RuntimeError):
    """The SparkSession could not be built; the message carries Spark's error and YARN's view."""


def application_id() -> str | None:
    """The YARN application this driver runs in, from the container's id (known before any SparkContext)."""
    match = _CONTAINER.match(os.environ.get("CONTAINER_ID", ""))
    return f"application_{match.group(1)}_{match.group(2)}" if match else None


def _spark_message(exc: BaseException) -> str:
    """Spark's own words for a failed build: the Java exception's text when there is one (not its stack)."""
    java = getattr(exc, "java_exception", None)
    if java is not None:
        try:
            return str(java.toString())
        except Exception:  # the JVM may be gone: fall back to Python's text
            pass
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _say(line: str) -> None:
    """A progress line in the waiting cell's output: on stderr, as progress goes, so that what the cell prints
    on stdout is its own."""
    print(line, file=sys.stderr, flush=True)


def _executors_text(counts: tuple[int, int] | None) -> str:
    """``N executors registered (of M requested)``, or "" before the SparkContext exists."""
    if counts is None:
        return ""
    registered, wanted = counts
    plural = "" if registered == 1 else "s"
    return f"{registered} executor{plural} registered" + (f" (of {wanted} requested)" if wanted else "")


class Build:
    """One background build of the SparkSession, and what a waiting cell shows about it.

    Two threads: one builds, one watches (YARN's state, executors) until the build ends. The waiting cell's
    thread only reads what they found: an interrupt there never cuts a py4j exchange or a request in half."""

    def __init__(self) -> None:
        self.started = time.time()
        #: When the build ended (successfully or not), seconds since the epoch.
        self.finished_at: float | None = None
        self.done = threading.Event()
        self.session: Any = None
        #: Why the build failed (Spark's words, YARN's view, how long the kernel has), or None.
        self.error: str | None = None
        #: What the watching thread saw last: ``YARN application ... RUNNING ...; N executors registered``.
        self.status = ""
        #: Said on the first use when the session has none of the executors it asked for, else "".
        self.starved = ""
        self.app_id = application_id()
        #: ``(SparkSession, SparkContext)`` once the build thread has imported pyspark. Other threads use these
        #: and never import pyspark themselves: two threads importing it at once can deadlock in its circular
        #: imports, which Python breaks by handing one of them a half-initialized ``pyspark.sql``.
        self.classes: tuple[Any, Any] | None = None
        self._rm_url: str | None = None
        self._used = False

    def start(self) -> Build:
        """Start building and watching; returns self."""
        threading.Thread(target=self.run, name="egd-spark-session", daemon=True).start()
        threading.Thread(target=self._watch, name="egd-spark-progress", daemon=True).start()
        return self

    def run(self) -> None:
        """Build the session (in the calling thread); the outcome goes to ``session`` or ``error``."""
        try:
            from pyspark import SparkContext
            from pyspark.sql import SparkSession

            self.classes = SparkSession, SparkContext
            SparkContext._ensure_initialized()  # the JVM's gateway first: progress asks YARN through it meanwhile
            self.session = SparkSession.builder.getOrCreate()
            self.app_id = str(self.session.sparkContext.applicationId)
            counts = self.executor_counts()
            self.status = _executors_text(counts)
            self.starved = self._starved(counts)
        except BaseException as exc:  # anything the build raises is the user's error on first use
            self.error = self._failure(_spark_message(exc))
        finally:
            self.finished_at = time.time()
            self.done.set()

    def _watch(self) -> None:
        while not self.done.is_set():
            self.status = self._describe()
            self.done.wait(PROGRESS_EVERY / 2)

    # -- what the waiting cell shows (found by the build's threads) --------------------------------------

    def _jvm(self) -> Any:
        """The driver JVM's py4j view once the build has connected to it, else None."""
        return self.classes[1]._jvm if self.classes is not None else None

    def yarn_state(self) -> str:
        """``RUNNING in queue default: diagnostics`` from the ResourceManager's REST API, or "" when it does not
        answer (no JVM yet, a Kerberos-only RM, a network that does not reach it)."""
        if not self.app_id:
            return ""
        try:
            import urllib.request  # here: the kernel's start need not wait for it

            if self._rm_url is None:
                jvm = self._jvm()
                if jvm is None:
                    return ""
                conf = jvm.org.apache.hadoop.yarn.conf.YarnConfiguration()
                self._rm_url = str(jvm.org.apache.hadoop.yarn.webapp.util.WebAppUtils.getRMWebAppURLWithScheme(conf))
            with urllib.request.urlopen(f"{self._rm_url}/ws/v1/cluster/apps/{self.app_id}",
                                        timeout=RM_TIMEOUT) as answer:
                app = json.load(answer).get("app") or {}
        except Exception:
            return ""
        text = f"{app.get('state', '?')} in queue {app.get('queue', '?')}"
        diagnostics = " ".join(str(app.get("diagnostics") or "").split())
        return f"{text}: {diagnostics[:300]}" if diagnostics else text

    def executor_counts(self) -> tuple[int, int] | None:
        """Executors registered and requested (0: dynamic allocation) once the SparkContext exists, else None."""
        if self.classes is None:
            return None
        try:
            sc = self.classes[1]._active_spark_context
            if sc is None or getattr(sc, "_jsc", None) is None:
                return None
            registered = max(0, len(sc._jsc.sc().statusTracker().getExecutorInfos()) - 1)  # minus the driver
            wanted = int(sc.getConf().get("spark.executor.instances") or 0)
        except Exception:
            return None
        return registered, wanted

    def _describe(self) -> str:
        """``YARN application ID STATE ...; N executors registered (of M requested)``, as far as known."""
        parts = []
        if self.app_id:
            state = self.yarn_state()
            parts.append(f"YARN application {self.app_id}" + (f" {state}" if state else ""))
        executors = _executors_text(self.executor_counts())
        if executors:
            parts.append(executors)
        return "; ".join(parts)

    def _starved(self, counts: tuple[int, int] | None) -> str:
        """The session exists but none of the executors it asked for came (a full queue): what to say."""
        if counts is None or counts[0] or not counts[1]:
            return ""
        state = self.yarn_state()
        return (f"egd: none of the {counts[1]} executors requested has registered; Spark jobs wait until YARN "
                f"grants them (YARN application {self.app_id}{' ' + state if state else ''})")

    def _failure(self, spark_says: str) -> str:
        """The text of the error every use of a failed build raises."""
        state = self.yarn_state()
        where = f"\nYARN application {self.app_id}: {state}" if self.app_id and state else ""
        # In YARN cluster mode the application master gives up on a driver without a SparkContext after
        # spark.yarn.am.waitTime: the kernel ends then, with its application.
        limit = ""
        try:
            jvm = self._jvm()
            wait = jvm.java.lang.System.getProperty("spark.yarn.am.waitTime") if jvm is not None else None
            limit = f" until YARN ends the application (spark.yarn.am.waitTime {wait} after its start)" if wait else ""
        except Exception:
            pass
        return (f"the SparkSession could not be built: {spark_says}{where}\n"
                f"The kernel still runs{limit}; restart it to try again.")

    def progress(self) -> str:
        """One progress line."""
        waited = time.time() - self.started
        return f"egd: waiting for the SparkSession ({waited:.0f}s)" + (f"; {self.status}" if self.status else "")

    def wait(self) -> Any:
        """The session, once built; until then progress lines on stderr (the waiting cell's output). Raises
        :class:`SparkSessionUnavailable` when the build failed, and ``KeyboardInterrupt`` on an interrupt (the
        build goes on)."""
        if not self.done.is_set():
            try:
                _say(self.progress())
                shown = time.monotonic()
                while not self.done.wait(WAIT_STEP):
                    if time.monotonic() - shown >= PROGRESS_EVERY:
                        _say(self.progress())
                        shown = time.monotonic()
            except KeyboardInterrupt:
                _say("egd: interrupted; the SparkSession is still being built, the next use of spark or sc waits "
                     "for it again")
                raise
            if self.session is not None:
                _say(f"egd: SparkSession ready after {self.finished_at - self.started:.0f}s"  # type: ignore[operator]
                     f" (application {self.app_id or '?'}{'; ' + self.status if self.status else ''})")
        if self.error is not None:
            raise SparkSessionUnavailable(self.error)
        if not self._used:  # the first use, waited or not, says when the session has no executors
            self._used = True
            if self.starved:
                _say(self.starved)
        return self.session


#: Names besides dunders that completion and inspection ask any object for (see ``_Proxy.__getattr__``).
_PROBES = frozenset({"getdoc", "trait_names", "_getAttributeNames"})


class _Proxy:
    """Stands for ``spark`` or ``sc`` until the session exists: any use waits for it, then forwards."""

    __slots__ = ("_egd_build", "_egd_context")

    def __init__(self, build: Build, context: bool) -> None:
        object.__setattr__(self, "_egd_build", build)
        object.__setattr__(self, "_egd_context", context)

    def _egd_real(self) -> Any:
        session = self._egd_build.wait()
        return session.sparkContext if self._egd_context else session

    def __getattr__(self, name: str) -> Any:
        # Tools probe names that the real objects do not have (jedi's completion __wrapped__, IPython's inspector
        # getdoc and __call__): those must not wait for the build; until the session exists they are missing.
        if (name in _PROBES or (name.startswith("__") and name.endswith("__"))) and not self._egd_build.done.is_set():
            raise AttributeError(name)
        return getattr(self._egd_real(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._egd_real(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._egd_real(), name)

    def __dir__(self) -> list[str]:
        # Tab completion must not wait: before the build ends it lists the class's attributes.
        build = self._egd_build
        if build.session is not None:
            return dir(self._egd_real())
        if build.classes is None:  # pyspark is still being imported (by the build thread alone)
            return []
        return dir(build.classes[1] if self._egd_context else build.classes[0])

    def __repr__(self) -> str:
        # repr() is what variable inspectors and debuggers call on every variable: it must not wait. Displaying
        # the proxy as a cell's value does wait (IPython asks for _repr_html_ and the like, which forward).
        # After a failed build it says why rather than raising.
        build = self._egd_build
        if not build.done.is_set():
            what = "SparkContext" if self._egd_context else "SparkSession"
            return f"<{what} being built in the background ({time.time() - build.started:.0f}s); its first use " \
                   "waits for it>"
        if build.error is not None:
            return f"<no {'SparkContext' if self._egd_context else 'SparkSession'}: {build.error}>"
        return repr(self._egd_real())

    def __str__(self) -> str:
        # As repr(): the inspector (Shift-Tab, ``spark?``) shows str() and must not wait either.
        return str(self._egd_real()) if self._egd_build.done.is_set() else repr(self)

    def __enter__(self) -> Any:
        return self._egd_real().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._egd_real().__exit__(*exc)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self._egd_real().__reduce_ex__(protocol)


#: The current kernel's build (tests and the proxies' users can look at it: ``sys.modules[...].BUILD``).
BUILD: Build | None = None


def _swap(namespace: dict[str, Any]) -> None:
    """After a cell: once the session exists, the user's ``spark``/``sc`` that are still proxies become the
    real objects (``isinstance`` then holds); the proxies kept elsewhere keep forwarding."""
    build = BUILD
    if build is None or build.session is None:
        return
    for name, context in (("spark", False), ("sc", True)):
        value = namespace.get(name)
        if isinstance(value, _Proxy) and value._egd_build is build:
            namespace[name] = build.session.sparkContext if context else build.session


def install(mode: str, namespace: dict[str, Any], shell: Any = None) -> None:
    """Put ``spark`` and ``sc`` into ``namespace`` as ``mode`` says (``lazy``, ``eager`` or ``none``)."""
    global BUILD
    if mode not in MODES:
        raise ValueError(f"spark_session must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "none":
        return
    # pyspark warns that it cannot put the files egd's spark-submit ships (the launcher's modules) on the Python
    # path; they are not the user's and the warning would land in whichever cell runs when the session is built.
    warnings.filterwarnings("ignore", message=r"Failed to add file \[\S*/(launcher_protocol|lazy_spark)\.py\]",
                            category=RuntimeWarning)
    build = Build()
    BUILD = build
    if mode == "eager":
        build.run()  # in the main thread, as before lazy mode existed (pyspark's SIGINT handler included)
        if build.error is not None:
            raise SparkSessionUnavailable(build.error)
        namespace["spark"], namespace["sc"] = build.session, build.session.sparkContext
        return
    build.start()
    namespace["spark"], namespace["sc"] = _Proxy(build, False), _Proxy(build, True)
    if shell is not None:
        shell.events.register("post_run_cell", lambda *_: _swap(namespace))
