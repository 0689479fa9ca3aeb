"""The emulator's answers checked against Mailchimp's own Swagger 2.0 definitions.

The specs in `<repo>/../shared/specs/mailchimp/*.yml` inline their response schemas (any `$ref`
is resolved into the file). Swagger 2.0 schema objects are JSON Schema draft-4 plus extra
keywords (`readOnly`, `example`, `x-*`), which draft-4 validation ignores. For the core objects
(member, members page, list, webhook) the check is strict: an object may carry no property the
spec does not document.
"""

import copy
import functools
import hashlib
import pathlib

import jsonschema
import pytest
import requests
import yaml

SPECS = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "specs" / "mailchimp"


@functools.lru_cache(maxsize=None)
def spec(name):
    path = SPECS / name
    if not path.exists():
        pytest.fail(f"Mailchimp spec {path} not found")
    # The C loader reads the 27k-line list-id.yml in a second instead of half a minute.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open() as handle:
        return yaml.load(handle, Loader=loader)


def resolve(node, root, seen=()):
    """Inlines local `$ref`s (`#/definitions/...`, `#/components/schemas/...`)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            if ref in seen:
                return {}
            target = root
            for part in ref[2:].split("/"):
                target = target[part]
            return resolve(target, root, seen + (ref,))
        return {key: resolve(value, root, seen) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item, root, seen) for item in node]
    return node


def to_draft4(schema, strict):
    """Swagger 2.0 schema object -> JSON Schema draft-4 (optionally closed objects)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("required"), bool):  # a misplaced parameter-style flag
                del node["required"]
            node.pop("discriminator", None)
            if strict and node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    schema["$schema"] = "http://json-schema.org/draft-04/schema#"
    jsonschema.Draft4Validator.check_schema(schema)
    return schema


def response_schema(file, path, method, status="200", strict=False):
    root = spec(file)
    responses = root["paths"][path][method]["responses"]
    return to_draft4(resolve(responses[status]["schema"], root), strict)


def assert_valid(instance, schema):
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:20])


@pytest.fixture(scope="module")
def api(sandbox):
    session = requests.Session()
    session.auth = ("user", sandbox["mailchimp_api_key"])
    base = sandbox["mailchimp_url"]

    def call(method, path, **kwargs):
        return session.request(method, base + path, timeout=10, **kwargs)

    return call


def ok_json(response):
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    return response.json()


def test_lists_match_the_spec(api, sandbox):
    assert_valid(ok_json(api("GET", "/lists")), response_schema("lists.yml", "/lists", "get", strict=True))
    assert_valid(ok_json(api("GET", f"/lists/{sandbox['audiences'][0]}")),
                 response_schema("list-id.yml", "/lists/{list_id}", "get", strict=True))


def test_members_match_the_spec(api, sandbox):
    list_id = sandbox["audiences"][0]
    page = ok_json(api("GET", f"/lists/{list_id}/members", params={"count": 1000}))
    assert_valid(page, response_schema("members.yml", "/lists/{list_id}/members", "get", strict=True))
    statuses = {member["status"] for member in page["members"]}
    assert {"subscribed", "unsubscribed"} <= statuses
    one_path = "/lists/{list_id}/members/{subscriber_hash}"
    member = ok_json(api("GET", f"/lists/{list_id}/members/{page['members'][0]['id']}"))
    assert_valid(member, response_schema("members.yml", one_path, "get", strict=True))
    email = "schema.check@example.com"
    digest = hashlib.md5(email.encode()).hexdigest()
    put = ok_json(api("PUT", f"/lists/{list_id}/members/{digest}",
                      json={"email_address": email, "status_if_new": "subscribed"}))
    assert_valid(put, response_schema("members.yml", one_path, "put", strict=True))
    patch = ok_json(api("PATCH", f"/lists/{list_id}/members/{digest}", json={"merge_fields": {"FNAME": "S"}}))
    assert_valid(patch, response_schema("members.yml", one_path, "patch", strict=True))


def test_batch_and_search_match_the_spec(api, sandbox):
    list_id = sandbox["audiences"][1]
    batch = ok_json(api("POST", f"/lists/{list_id}", json={"update_existing": False, "members": [
        {"email_address": "schema.batch@example.com", "status": "subscribed"},
        {"email_address": "schema.batch@example.com", "status": "subscribed"},
    ]}))
    assert batch["error_count"] == 1
    # The spec's batch member schema omits fields its own member schema has: not strict.
    assert_valid(batch, response_schema("list-id.yml", "/lists/{list_id}", "post"))
    found = ok_json(api("GET", "/search-members", params={"query": "schema.batch@example.com"}))
    assert found["exact_matches"]["total_items"] == 1
    assert_valid(found, response_schema("search.yml", "/search-members", "get"))


def test_webhooks_match_the_spec(api, sandbox):
    list_id = sandbox["audiences"][2]
    hooks = ok_json(api("GET", f"/lists/{list_id}/webhooks"))
    assert_valid(hooks, response_schema("webhooks.yml", "/lists/{list_id}/webhooks", "get", strict=True))


def test_errors_are_problem_documents(api, sandbox):
    list_id = sandbox["audiences"][0]
    one_path = "/lists/{list_id}/members/{subscriber_hash}"
    problem = response_schema("members.yml", one_path, "get", status="default")
    missing = api("GET", f"/lists/{list_id}/members/{'0' * 32}")
    assert missing.status_code == 404
    assert missing.headers["Content-Type"] == "application/problem+json; charset=utf-8"
    assert_valid(missing.json(), problem)
    unsubscribed = ok_json(api("GET", f"/lists/{list_id}/members", params={"status": "unsubscribed", "count": 1}))
    member = unsubscribed["members"][0]
    refused = api("PATCH", f"/lists/{list_id}/members/{member['id']}", json={"status": "subscribed"})
    assert refused.status_code == 400 and refused.json()["title"] == "Member In Compliance State"
    assert_valid(refused.json(), response_schema("members.yml", one_path, "patch", status="default"))
    unauthorized = requests.get(sandbox["mailchimp_url"] + "/lists", auth=("user", "wrong-us1"), timeout=10)
    assert unauthorized.status_code == 401
    assert_valid(unauthorized.json(), response_schema("lists.yml", "/lists", "get", status="default"))
    bad_json = api("PUT", f"/lists/{list_id}/members/{member['id']}", data="{not json",
                   headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400
    assert_valid(bad_json.json(), problem)
