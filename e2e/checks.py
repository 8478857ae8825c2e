"""Checks for the end-to-end test that are easier over parsed JSON.

Each command exits 0 when the check holds, and otherwise 1 with one line
on standard error that describes what was found instead.

Commands:
  registrations FILE
      Print how many POST /vps/register requests the fake platform's
      request log FILE (JSON lines) contains.
  registration FILE
      Check that FILE contains exactly one registration, answered 200, sent
      with "Authorization: Bearer $E2E_TOKEN" and a body naming
      $E2E_MACHINE_ID, $E2E_SERVER_ID, $E2E_PUBLIC_IPV4, $E2E_PUBLIC_IPV6
      (when set) and $E2E_IMAGE_VERSION.
  order FIRST SECOND
      Read `journalctl -o json` lines from standard input and check that
      the start job of unit FIRST finished successfully before the start
      job of unit SECOND did.
  started UNIT
      Read `journalctl -o json` lines from standard input and print how many
      start jobs of UNIT finished successfully.
  meta FILE MAX_AGE_SECONDS [refreshed]
      Check vps-meta.json in FILE: version 1, status running, userId
      $E2E_USER_ID, machineId $E2E_MACHINE_ID, and lastSyncAt at most
      MAX_AGE_SECONDS old. With "refreshed", lastSyncAt must also be later
      than provisionedAt, which shows that the heartbeat, not only the
      platform, wrote it.
"""

import json
import os
import sys
from datetime import datetime, timezone

REGISTER_PATH = "/vps/register"


class CheckFailed(Exception):
    pass


def read_json_lines(lines):
    entries = []
    for line in lines:
        line = line.strip()
        if line:
            entries.append(json.loads(line))
    return entries


def registrations_in(path):
    with open(path, encoding="utf-8") as file:
        requests = read_json_lines(file)
    return [
        request
        for request in requests
        if request["method"] == "POST" and request["path"] == REGISTER_PATH
    ]


def check_registration(path):
    registrations = registrations_in(path)
    if len(registrations) != 1:
        statuses = [request.get("status") for request in registrations]
        raise CheckFailed(
            f"expected 1 registration request, found {len(registrations)} (statuses {statuses})"
        )
    request = registrations[0]
    if request.get("status") != 200:
        raise CheckFailed(
            f"the registration got status {request.get('status')}: {request.get('detail')}"
        )
    authorization = request["headers"].get("authorization")
    if authorization != "Bearer " + os.environ["E2E_TOKEN"]:
        raise CheckFailed("the registration did not carry the bearer token")

    body = request.get("body") or {}
    expected = {
        "machineId": os.environ["E2E_MACHINE_ID"],
        "hetznerServerId": int(os.environ["E2E_SERVER_ID"]),
        "publicIPv4": os.environ["E2E_PUBLIC_IPV4"],
        "imageVersion": os.environ["E2E_IMAGE_VERSION"],
    }
    if os.environ.get("E2E_PUBLIC_IPV6"):
        expected["publicIPv6"] = os.environ["E2E_PUBLIC_IPV6"]
    for field, value in expected.items():
        if body.get(field) != value:
            raise CheckFailed(
                f"registration field {field} is {body.get(field)!r}, expected {value!r}"
            )


def job_finish_times(entries, unit):
    """Returns the times (microseconds) at which start jobs of `unit` ended
    successfully, from systemd's job-result fields."""
    return [
        int(entry["__REALTIME_TIMESTAMP"])
        for entry in entries
        if entry.get("UNIT") == unit
        and entry.get("JOB_TYPE") == "start"
        and entry.get("JOB_RESULT") == "done"
    ]


def check_order(first, second, lines):
    entries = read_json_lines(lines)
    first_times = job_finish_times(entries, first)
    second_times = job_finish_times(entries, second)
    if not first_times:
        raise CheckFailed(f"the journal shows no successful start of {first}")
    if not second_times:
        raise CheckFailed(f"the journal shows no successful start of {second}")
    if min(second_times) <= min(first_times):
        gap = (min(first_times) - min(second_times)) / 1e6
        raise CheckFailed(f"{second} started {gap:.3f} s before {first} finished")


def parse_time(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def check_meta(path, max_age, refreshed):
    with open(path, encoding="utf-8") as file:
        meta = json.load(file)
    expected = {
        "version": 1,
        "status": "running",
        "userId": os.environ["E2E_USER_ID"],
        "machineId": os.environ["E2E_MACHINE_ID"],
    }
    for field, value in expected.items():
        if meta.get(field) != value:
            raise CheckFailed(f"vps-meta.json {field} is {meta.get(field)!r}, expected {value!r}")
    last_sync = parse_time(meta["lastSyncAt"])
    age = (datetime.now(timezone.utc) - last_sync).total_seconds()
    if age > max_age:
        raise CheckFailed(f"vps-meta.json lastSyncAt {meta['lastSyncAt']} is {age:.0f} s old")
    if refreshed and last_sync <= parse_time(meta["provisionedAt"]):
        raise CheckFailed(
            f"lastSyncAt {meta['lastSyncAt']} is not later than provisionedAt "
            f"{meta['provisionedAt']}: the heartbeat has not refreshed it"
        )


def main(arguments):
    command, rest = (arguments[0], arguments[1:]) if arguments else ("", [])
    try:
        if command == "registrations" and len(rest) == 1:
            print(len(registrations_in(rest[0])))
        elif command == "registration" and len(rest) == 1:
            check_registration(rest[0])
        elif command == "order" and len(rest) == 2:
            check_order(rest[0], rest[1], sys.stdin)
        elif command == "started" and len(rest) == 1:
            print(len(job_finish_times(read_json_lines(sys.stdin), rest[0])))
        elif command == "meta" and len(rest) in (2, 3):
            check_meta(rest[0], float(rest[1]), rest[2:] == ["refreshed"])
        else:
            sys.stderr.write(f"checks.py: invalid command line {arguments!r}\n{__doc__}")
            return 2
    except CheckFailed as failure:
        sys.stderr.write(f"{failure}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
