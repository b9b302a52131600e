"""schemathesis hooks for tests/it/contract.rs: the check that a refused request writes nothing.

Before each call the admin plane's state is read (its sync version and the last audit entry);
after a call answered 4xx or 5xx it is read again. A refusal may leave an `auth.failed` audit
entry (failed logins are audited on purpose) and nothing else: no new version, no other entry.
Reads go straight to the API with urllib, not through schemathesis, so they are not checked or
counted as test cases. Runs with one worker: another worker's write would look like a leak.
"""

import json
import os
import urllib.request

import schemathesis

BASE = os.environ["PERMISO_CONTRACT_BASE"]
KEY = os.environ["PERMISO_CONTRACT_ADMIN_KEY"]
# How many refusals the check judged, written for the Rust test: a check that never ran (hooks
# not loaded, a renamed hook) must not pass as a check that found nothing.
JUDGED = os.environ["PERMISO_CONTRACT_JUDGED_FILE"]
_before = {}
_after = {}
_judged = 0


def _get(path):
    req = urllib.request.Request(BASE + path, headers={"X-Admin-Api-Key": KEY})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _state():
    version = _get("/auth/admin/changes/0")["current_version"]
    seq = 0
    while True:
        page = _get(f"/auth/admin/audit?after={seq}&limit=1000")
        if page["entries"]:
            seq = page["entries"][-1]["seq"]
        if page["next_after"] is None:
            return version, seq


def _written_since(seq):
    """Audit actions after `seq`, other than failed logins."""
    actions = []
    while True:
        page = _get(f"/auth/admin/audit?after={seq}&limit=1000")
        for e in page["entries"]:
            seq = e["seq"]
            if e["action"] != "auth.failed":
                actions.append(e["action"])
        if page["next_after"] is None:
            return actions


@schemathesis.hook
def before_call(context, case, **kwargs):
    _before[case.id] = _state()


@schemathesis.hook
def after_call(context, case, response):
    if response.status_code >= 400 and case.id in _before:
        version_before, seq_before = _before[case.id]
        version_after = _get("/auth/admin/changes/0")["current_version"]
        _after[case.id] = (version_before, version_after, _written_since(seq_before))


@schemathesis.check
def refused_request_writes_nothing(ctx, response, case):
    """A request answered 4xx/5xx changes no state: same sync version, no audit entry but a
    failed login's."""
    if response.status_code < 400 or case.id not in _after:
        return None
    global _judged
    before, after, written = _after.pop(case.id)
    _before.pop(case.id, None)
    _judged += 1
    with open(JUDGED, "w") as f:
        f.write(str(_judged))
    if after != before or written:
        raise AssertionError(
            f"{case.method} {case.formatted_path} answered {response.status_code} and wrote: "
            f"version {before} -> {after}, audit {written}"
        )
    return None
