"""The unchanged official `mailchimp-marketing` client against the sandbox's Mailchimp emulator."""

import hashlib
import http.server
import json
import re
import threading
import time
import urllib.parse

import mailchimp_marketing as MailchimpMarketing
import pytest
import requests
from mailchimp_marketing.api_client import ApiClientError

PROBLEM_FIELDS = {"type", "title", "status", "detail", "instance"}


def subscriber_hash(email):
    return hashlib.md5(email.strip().lower().encode()).hexdigest()


def make_client(info, api_key=None):
    client = MailchimpMarketing.Client({"api_key": api_key or info["mailchimp_api_key"]})
    client.api_client.host = info["mailchimp_url"]
    return client


@pytest.fixture(scope="module")
def mc(sandbox):
    return make_client(sandbox)


def problem_of(error):
    assert isinstance(error.text, str), "problem+json arrives as raw text in the official client"
    body = json.loads(error.text)
    assert PROBLEM_FIELDS <= body.keys()
    assert body["status"] == error.status_code
    return body


def first_member(mc, list_id, status):
    page = mc.lists.get_list_members_info(list_id, status=status, count=1)
    assert page["members"], f"the generator made no {status} member"
    return page["members"][0]


def eventually(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_lists_are_the_generated_audiences_with_stats(mc, sandbox):
    answer = mc.lists.get_all_lists(count=100)
    assert answer["total_items"] == 3
    assert sorted(lst["id"] for lst in answer["lists"]) == sorted(sandbox["audiences"])
    for audience in answer["lists"]:
        assert re.fullmatch(r"[0-9a-f]{10}", audience["id"])
        stats = audience["stats"]
        assert stats["member_count"] > 0
        assert stats["total_contacts"] >= stats["member_count"] + stats["unsubscribe_count"]
    one = mc.lists.get_list(sandbox["audiences"][0], fields=["id", "stats.member_count"])
    assert set(one) == {"id", "stats"} and set(one["stats"]) == {"member_count"}


def test_pages_members_and_filters_by_last_changed(mc, sandbox):
    list_id = sandbox["audiences"][0]
    seen, offset, total = [], 0, None
    while total is None or offset < total:
        page = mc.lists.get_list_members_info(list_id, count=25, offset=offset)
        total = page["total_items"]
        assert page["list_id"] == list_id
        seen.extend(member["id"] for member in page["members"])
        offset += 25
    assert len(seen) == total == len(set(seen))

    member = first_member(mc, list_id, "subscribed")
    before = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 2))
    updated = mc.lists.update_list_member(list_id, member["id"], {"status": "unsubscribed"})
    assert updated["status"] == "unsubscribed"
    assert updated["last_changed"] > member["last_changed"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", updated["last_changed"])
    changed = mc.lists.get_list_members_info(
        list_id,
        since_last_changed=before,
        sort_field="last_changed",
        sort_dir="ASC",
        fields=["members.email_address", "members.status", "total_items"],
    )
    assert changed["total_items"] >= 1
    assert {"email_address": member["email_address"], "status": "unsubscribed"} in changed["members"]
    assert all(set(m) == {"email_address", "status"} for m in changed["members"])
    assert set(changed) == {"members", "total_items"}
    older = mc.lists.get_list_members_info(list_id, before_last_changed=before, count=1000,
                                           exclude_fields=["members._links", "_links"])
    assert member["id"] not in {m["id"] for m in older["members"]}
    unsubscribed = mc.lists.get_list_members_info(list_id, status="unsubscribed", count=1000)
    assert all(m["status"] == "unsubscribed" for m in unsubscribed["members"])
    assert unsubscribed["total_items"] == len(unsubscribed["members"])


def test_member_lifecycle_get_put_patch_archive_and_permanent_delete(mc, sandbox):
    list_id = sandbox["audiences"][1]
    email = "Py.Lifecycle@Example.com"
    digest = subscriber_hash(email)
    created = mc.lists.set_list_member(list_id, digest, {"email_address": email, "status_if_new": "subscribed",
                                                         "merge_fields": {"FNAME": "Py"}})
    assert created["id"] == digest and created["status"] == "subscribed"
    assert created["merge_fields"]["FNAME"] == "Py"
    assert created["timestamp_signup"] == "" and created["ip_signup"] == ""
    fetched = mc.lists.get_list_member(list_id, email.lower())
    assert fetched["unique_email_id"] == created["unique_email_id"]
    patched = mc.lists.update_list_member(list_id, digest, {"merge_fields": {"LNAME": "Thon"}})
    assert patched["full_name"] == "Py Thon" and patched["last_changed"] >= created["last_changed"]

    archived = mc.lists.delete_list_member(list_id, digest)
    assert archived.status_code == 204 and archived.text == ""
    assert mc.lists.get_list_member(list_id, digest)["status"] == "archived"
    with pytest.raises(ApiClientError) as refused:
        mc.lists.delete_list_member(list_id, digest)
    assert refused.value.status_code == 405
    assert problem_of(refused.value)["title"] == "Method Not Allowed"

    other = first_member(mc, list_id, "subscribed")
    with pytest.raises(ApiClientError) as exists:
        mc.lists.add_list_member(list_id, {"email_address": other["email_address"].upper(), "status": "subscribed"})
    assert problem_of(exists.value)["title"] == "Member Exists"

    gone = mc.lists.delete_list_member_permanent(list_id, digest)
    assert gone.status_code == 204
    with pytest.raises(ApiClientError) as missing:
        mc.lists.get_list_member(list_id, digest)
    assert missing.value.status_code == 404
    with pytest.raises(ApiClientError) as forgotten:
        mc.lists.set_list_member(list_id, digest, {"email_address": email, "status_if_new": "subscribed"})
    assert problem_of(forgotten.value)["title"] == "Forgotten Email Not Subscribed"


def test_status_if_new_does_not_resubscribe_an_unsubscribed_member(mc, sandbox):
    list_id = sandbox["audiences"][2]
    member = first_member(mc, list_id, "unsubscribed")
    answer = mc.lists.set_list_member(list_id, member["id"], {"email_address": member["email_address"],
                                                              "status_if_new": "subscribed"})
    assert answer["status"] == "unsubscribed"
    unsub = mc.lists.set_list_member(list_id, subscriber_hash("py.new.unsub@example.com"),
                                     {"email_address": "py.new.unsub@example.com",
                                      "status_if_new": "unsubscribed", "status": "unsubscribed"})
    assert unsub["status"] == "unsubscribed"


def test_refuses_to_resubscribe_a_member_in_compliance_state(mc, sandbox):
    list_id = sandbox["audiences"][2]
    for status in ("unsubscribed", "cleaned"):
        member = first_member(mc, list_id, status)
        for call in (
            lambda: mc.lists.update_list_member(list_id, member["id"], {"status": "subscribed"}),
            lambda: mc.lists.set_list_member(list_id, member["id"], {"email_address": member["email_address"],
                                                                     "status_if_new": "subscribed",
                                                                     "status": "subscribed"}),
        ):
            with pytest.raises(ApiClientError) as error:
                call()
            assert error.value.status_code == 400
            body = problem_of(error.value)
            assert body["title"] == "Member In Compliance State"
            assert member["email_address"] in body["detail"]
    member = first_member(mc, list_id, "unsubscribed")
    assert mc.lists.update_list_member(list_id, member["id"], {"status": "pending"})["status"] == "pending"


def test_unknown_resources_are_404_problem_json(mc, sandbox):
    with pytest.raises(ApiClientError) as error:
        mc.lists.get_list_member(sandbox["audiences"][0], "nobody@nowhere.example.com")
    body = problem_of(error.value)
    assert body["title"] == "Resource Not Found" and error.value.status_code == 404
    response = requests.get(sandbox["mailchimp_url"] + "/lists/0000000000",
                            auth=("user", sandbox["mailchimp_api_key"]), timeout=10)
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/problem+json; charset=utf-8"
    assert response.headers["X-Request-Id"] == response.json()["instance"]


def test_checks_the_api_key(sandbox):
    bad = make_client(sandbox, api_key="0123456789abcdef0123456789abcdef-us1")
    with pytest.raises(ApiClientError) as error:
        bad.lists.get_all_lists()
    assert error.value.status_code == 401
    assert problem_of(error.value)["title"] == "API Key Invalid"


def test_batch_subscribe_reports_per_member_errors(mc, sandbox):
    list_id = sandbox["audiences"][0]
    existing = first_member(mc, list_id, "subscribed")
    unsubscribed = first_member(mc, list_id, "unsubscribed")
    answer = mc.lists.batch_list_members(list_id, {
        "update_existing": True,
        "members": [
            {"email_address": "py.batch.1@example.com", "status": "subscribed"},
            {"email_address": existing["email_address"], "status": "subscribed",
             "merge_fields": {"FNAME": "Batched"}},
            {"email_address": unsubscribed["email_address"], "status": "subscribed"},
            {"email_address": "not an email", "status": "subscribed"},
        ],
    })
    assert answer["total_created"] == 1 and answer["total_updated"] == 1 and answer["error_count"] == 2
    assert answer["new_members"][0]["email_address"] == "py.batch.1@example.com"
    assert answer["updated_members"][0]["merge_fields"]["FNAME"] == "Batched"
    assert {e["error_code"] for e in answer["errors"]} == {"ERROR_GENERIC"}
    again = mc.lists.batch_list_members(list_id, {
        "update_existing": False,
        "members": [{"email_address": "PY.BATCH.1@example.com", "status": "subscribed"}],
    })
    assert again["errors"][0]["error_code"] == "ERROR_CONTACT_EXISTS"
    with pytest.raises(ApiClientError) as too_many:
        mc.lists.batch_list_members(list_id, {"members": [
            {"email_address": f"bulk{i}@example.com", "status": "subscribed"} for i in range(501)]})
    assert too_many.value.status_code == 400


def test_search_members_finds_exact_and_partial_matches(mc, sandbox):
    member = first_member(mc, sandbox["audiences"][0], "subscribed")
    found = mc.searchMembers.search(member["email_address"].upper())
    assert member["id"] in {m["id"] for m in found["exact_matches"]["members"]}
    assert found["exact_matches"]["total_items"] >= 1
    partial = mc.searchMembers.search(member["merge_fields"]["LNAME"], list_id=sandbox["audiences"][0])
    assert partial["full_search"]["total_items"] >= 1
    assert all(m["list_id"] == sandbox["audiences"][0] for m in partial["full_search"]["members"])


class _Receiver(http.server.BaseHTTPRequestHandler):
    """Records every request; answers GET with the status in `server.get_status`."""

    def do_GET(self):  # noqa: N802 (http.server naming)
        self.server.requests.append(("GET", self.path, self.headers, ""))
        self.send_response(self.server.get_status)
        self.end_headers()

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length).decode()
        self.server.requests.append(("POST", self.path, self.headers, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def receiver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.requests = []
    server.get_status = 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def posts(server, path):
    return [r for r in list(server.requests) if r[0] == "POST" and r[1] == path]


def test_webhooks_validate_on_registration_and_deliver_form_posts(mc, sandbox, receiver):
    list_id = sandbox["audiences"][1]
    base = f"http://127.0.0.1:{receiver.server_address[1]}"

    receiver.get_status = 500
    with pytest.raises(ApiClientError) as refused:
        mc.lists.create_list_webhook(list_id, {"url": base + "/broken"})
    assert refused.value.status_code == 400
    receiver.get_status = 200

    hook = mc.lists.create_list_webhook(list_id, {
        "url": base + "/hook?secret=s3",
        "events": {"subscribe": True, "unsubscribe": True, "profile": True, "cleaned": True, "upemail": True},
        "sources": {"user": True, "admin": True, "api": False},
    })
    validation = [r for r in receiver.requests if r[0] == "GET" and r[1] == "/hook?secret=s3"]
    assert validation and validation[0][2]["User-Agent"] == "MailChimp.com WebHook Validator"
    assert hook["url"] == base + "/hook?secret=s3" and hook["list_id"] == list_id
    assert hook["sources"] == {"user": True, "admin": True, "api": False}
    assert hook["id"] in {h["id"] for h in mc.lists.get_list_webhooks(list_id)["webhooks"]}
    assert mc.lists.get_list_webhook(list_id, hook["id"])["events"]["unsubscribe"] is True

    # An API change is not delivered (sources.api is off); a member's own unsubscribe is.
    api_member = first_member(mc, list_id, "subscribed")
    mc.lists.update_list_member(list_id, api_member["id"], {"status": "unsubscribed"})
    member = first_member(mc, list_id, "subscribed")
    control = f"{sandbox['control_url']}/mailchimp/lists/{list_id}/members/{urllib.parse.quote(member['email_address'])}"
    assert requests.post(control + "/unsubscribe", params={"campaign_id": "cb398d21d2"}, timeout=10).ok

    deliveries = eventually(lambda: posts(receiver, "/hook?secret=s3"), what="the unsubscribe delivery")
    _, _, headers, body = deliveries[0]
    assert headers["User-Agent"] == "MailChimp.com"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = {key: values[-1] for key, values in urllib.parse.parse_qs(body, keep_blank_values=True).items()}
    assert form["type"] == "unsubscribe"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", form["fired_at"])
    assert form["data[action]"] == "unsub" and form["data[reason]"] == "manual"
    assert form["data[email]"] == member["email_address"]
    assert form["data[merges][EMAIL]"] == member["email_address"]
    assert form["data[merges][FNAME]"] == member["merge_fields"]["FNAME"]
    assert form["data[list_id]"] == list_id and form["data[campaign_id]"] == "cb398d21d2"
    assert form["data[id]"] == member["unique_email_id"]
    assert mc.lists.get_list_member(list_id, member["id"])["status"] == "unsubscribed"

    # The member resubscribes through the signup form, then bounces.
    assert requests.post(control + "/resubscribe", timeout=10).ok
    assert requests.post(control + "/bounce", timeout=10).ok
    types = eventually(lambda: (lambda t: t if {"subscribe", "cleaned"} <= t else None)(
        {urllib.parse.parse_qs(r[3])["type"][0] for r in posts(receiver, "/hook?secret=s3")}),
        what="subscribe and cleaned deliveries")
    assert "unsubscribe" in types
    emails = {urllib.parse.parse_qs(r[3]).get("data[email]", [""])[0] for r in posts(receiver, "/hook?secret=s3")}
    assert api_member["email_address"] not in emails

    updated = mc.lists.update_list_webhook(list_id, hook["id"], {"sources": {"user": True, "admin": True, "api": True}})
    assert updated["sources"]["api"] is True
    deleted = mc.lists.delete_list_webhook(list_id, hook["id"])
    assert deleted.status_code == 204
    assert hook["id"] not in {h["id"] for h in mc.lists.get_list_webhooks(list_id)["webhooks"]}


def test_control_endpoints_report_stats_and_faults(mc, sandbox):
    mc.lists.get_list_members_info(sandbox["audiences"][0], count=1)
    stats = requests.get(sandbox["stats_url"], timeout=10).json()
    assert stats["calls"]["mailchimp"]["GET /lists/{list_id}/members"] >= 1
    assert stats["total_calls"]["mailchimp"] >= 1
    assert stats["records_written"]["mailchimp"] >= 1
    faults_url = sandbox["control_url"] + "/faults"
    faults = requests.get(faults_url, timeout=10).json()
    faults["mailchimp"]["rate_503"] = 1.0
    assert requests.put(faults_url, json=faults, timeout=10).ok
    try:
        with pytest.raises(ApiClientError) as error:
            mc.lists.get_all_lists()
        assert error.value.status_code == 503
    finally:
        faults["mailchimp"]["rate_503"] = 0.0
        requests.put(faults_url, json=faults, timeout=10)
    found = requests.get(sandbox["control_url"] + "/mailchimp/members",
                         params={"email": first_member(mc, sandbox["audiences"][0], "subscribed")["email_address"]},
                         timeout=10).json()
    assert found["members"]
