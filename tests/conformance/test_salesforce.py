"""The unchanged simple-salesforce client (direct mode) against the sandbox's Salesforce emulator.

The token comes from the emulator's OAuth endpoint (client credentials or JWT bearer) through
`requests`, because simple-salesforce's own login flows always target `*.salesforce.com`.
"""

import csv
import io
import time
import uuid

import jwt
import pytest
import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceExpiredSession,
    SalesforceMalformedRequest,
    SalesforceResourceNotFound,
)

VERSION = "59.0"


def _session(info):
    session = requests.Session()
    # requests ignores session.verify when REQUESTS_CA_BUNDLE is set in the environment.
    session.trust_env = False
    session.verify = info["salesforce_ca_file"]
    return session


def _token(info, **form):
    session = _session(info)
    response = session.post(f"{info['salesforce_login_url']}/services/oauth2/token", data=form, timeout=10)
    return response


def _client_credentials_token(info):
    response = _token(
        info,
        grant_type="client_credentials",
        client_id=info["salesforce_client_id"],
        client_secret=info["salesforce_client_secret"],
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def sf(sandbox):
    """A simple-salesforce client with a fresh token (tests may expire every token)."""
    token = _client_credentials_token(sandbox)
    return Salesforce(
        instance_url=token["instance_url"],
        session_id=token["access_token"],
        session=_session(sandbox),
        version=VERSION,
    )


@pytest.fixture
def control(sandbox):
    return f"{sandbox['control_url']}/salesforce"


def _plain():
    session = requests.Session()
    session.trust_env = False
    return session


def test_client_credentials_token_has_the_documented_shape(sandbox):
    token = _client_credentials_token(sandbox)
    assert token["token_type"] == "Bearer"
    assert token["instance_url"] == sandbox["salesforce_instance_url"]
    assert token["issued_at"].isdigit() and len(token["issued_at"]) == 13
    assert {"access_token", "signature", "scope", "id"} <= token.keys()


def test_client_credentials_accepts_basic_auth_and_refuses_a_wrong_secret(sandbox):
    session = _session(sandbox)
    url = f"{sandbox['salesforce_login_url']}/services/oauth2/token"
    basic = session.post(
        url,
        data={"grant_type": "client_credentials"},
        auth=(sandbox["salesforce_client_id"], sandbox["salesforce_client_secret"]),
        timeout=10,
    )
    assert basic.status_code == 200, basic.text
    wrong = _token(
        sandbox,
        grant_type="client_credentials",
        client_id=sandbox["salesforce_client_id"],
        client_secret="wrong",
    )
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_client"
    assert "error_description" in wrong.json()


def test_jwt_bearer_flow_issues_a_token_for_the_approved_user(sandbox):
    with open(sandbox["salesforce_jwt_key_file"], encoding="ascii") as key_file:
        key = key_file.read()

    def assertion(subject):
        claims = {
            "iss": sandbox["salesforce_client_id"],
            "sub": subject,
            "aud": sandbox["salesforce_login_url"],
            "exp": int(time.time()) + 180,
        }
        return jwt.encode(claims, key, algorithm="RS256")

    grant = "urn:ietf:params:oauth:grant-type:jwt-bearer"
    good = _token(sandbox, grant_type=grant, assertion=assertion(sandbox["salesforce_jwt_username"]))
    assert good.status_code == 200, good.text
    assert good.json()["token_type"] == "Bearer"
    stranger = _token(sandbox, grant_type=grant, assertion=assertion("stranger@example.com"))
    assert stranger.status_code == 400
    assert stranger.json()["error"] == "invalid_grant"


def test_query_and_query_all_follow_next_records_url(sf):
    marker = f"Conformance{uuid.uuid4().hex[:12]}"
    records = [
        {"LastName": marker, "FirstName": f"P{number}", "Email": f"{marker.lower()}.{number}@example.com"}
        for number in range(2100)
    ]
    inserted = sf.bulk2.Contact.insert(records=records, wait=0.2)
    assert sum(batch["numberRecordsProcessed"] for batch in inserted) == 2100
    assert sum(batch["numberRecordsFailed"] for batch in inserted) == 0

    soql = f"SELECT Id, Email, HasOptedOutOfEmail FROM Contact WHERE LastName = '{marker}'"
    first = sf.query(soql)
    assert first["totalSize"] == 2100
    assert first["done"] is False
    assert len(first["records"]) == 2000
    assert first["nextRecordsUrl"].startswith("/services/data/v59.0/query/01g")
    record = first["records"][0]
    assert record["attributes"]["type"] == "Contact"
    assert record["attributes"]["url"].endswith(record["Id"])
    assert len(record["Id"]) == 18 and record["Id"].startswith("003")
    rest = sf.query_more(first["nextRecordsUrl"], identifier_is_url=True)
    assert rest["done"] is True
    assert len(rest["records"]) == 100
    assert "nextRecordsUrl" not in rest

    everything = sf.query_all(soql)
    assert everything["totalSize"] == 2100
    assert len({row["Id"] for row in everything["records"]}) == 2100


def test_contact_update_answers_204_and_bumps_system_modstamp(sf):
    contact = sf.query("SELECT Id, SystemModstamp FROM Contact WHERE HasOptedOutOfEmail = false LIMIT 1")["records"][0]
    status = sf.Contact.update(contact["Id"], {"HasOptedOutOfEmail": True})
    assert status == 204
    after = sf.Contact.get(contact["Id"])
    assert after["HasOptedOutOfEmail"] is True
    assert after["SystemModstamp"] > contact["SystemModstamp"]
    assert after["SystemModstamp"].endswith("+0000") and "." in after["SystemModstamp"]


def test_composite_update_reports_a_converted_lead_per_record(sf, control):
    suffix = uuid.uuid4().hex[:10]
    lead = sf.Lead.create({"LastName": "Convert", "Company": "Acme", "Email": f"convert.{suffix}@example.com"})
    assert lead["success"] is True and lead["id"].startswith("00Q")
    converted = _plain().post(f"{control}/leads/{lead['id']}/convert", timeout=10)
    assert converted.status_code == 200, converted.text
    contact = sf.query("SELECT Id FROM Contact WHERE HasOptedOutOfEmail = false LIMIT 1")["records"][0]
    body = {
        "allOrNone": False,
        "records": [
            {"attributes": {"type": "Contact"}, "id": contact["Id"], "HasOptedOutOfEmail": True},
            {"attributes": {"type": "Lead"}, "id": lead["id"], "HasOptedOutOfEmail": True},
        ],
    }
    results = sf.restful("composite/sobjects", method="PATCH", json=body)
    assert results[0] == {"id": contact["Id"], "success": True, "errors": []}
    assert results[1]["success"] is False
    assert results[1]["errors"][0]["statusCode"] == "CANNOT_UPDATE_CONVERTED_LEAD"
    assert "fields" in results[1]["errors"][0]

    body["allOrNone"] = True
    body["records"][0]["HasOptedOutOfEmail"] = False
    rolled_back = sf.restful("composite/sobjects", method="PATCH", json=body)
    assert rolled_back[0]["errors"][0]["statusCode"] == "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    assert sf.Contact.get(contact["Id"])["HasOptedOutOfEmail"] is True


def test_composite_update_refuses_more_than_200_records(sf):
    contact = sf.query("SELECT Id FROM Contact LIMIT 1")["records"][0]
    record = {"attributes": {"type": "Contact"}, "id": contact["Id"], "HasOptedOutOfEmail": True}
    with pytest.raises(SalesforceMalformedRequest) as refused:
        sf.restful("composite/sobjects", method="PATCH", json={"allOrNone": False, "records": [record] * 201})
    assert refused.value.status == 400


def test_bulk2_update_reports_failed_records(sf):
    contacts = sf.query("SELECT Id FROM Contact WHERE HasOptedOutOfEmail = false LIMIT 2")["records"]
    lead = sf.query("SELECT Id FROM Lead LIMIT 1")["records"][0]
    records = [{"Id": row["Id"], "HasOptedOutOfEmail": True} for row in contacts]
    records.append({"Id": lead["Id"], "HasOptedOutOfEmail": True})
    results = sf.bulk2.Contact.update(records=records, wait=0.2)
    assert sum(batch["numberRecordsProcessed"] for batch in results) == 3
    assert sum(batch["numberRecordsFailed"] for batch in results) == 1
    failed = list(csv.DictReader(io.StringIO(sf.bulk2.Contact.get_failed_records(results[0]["job_id"]))))
    assert len(failed) == 1
    assert failed[0]["sf__Id"] == lead["Id"]
    assert failed[0]["sf__Error"].startswith("MALFORMED_ID:")
    successful = list(csv.DictReader(io.StringIO(sf.bulk2.Contact.get_successful_records(results[0]["job_id"]))))
    assert {row["sf__Id"] for row in successful} == {row["Id"] for row in contacts}
    for row in contacts:
        assert sf.Contact.get(row["Id"])["HasOptedOutOfEmail"] is True


def test_api_usage_is_parsed_from_sforce_limit_info(sf, control):
    sf.query("SELECT Id FROM Contact LIMIT 1")
    usage = sf.api_usage["api-usage"]
    assert usage.total == 5_000_000
    assert usage.used >= 1
    served = _plain().get(f"{control}/api-usage", timeout=10).json()
    assert served["used"] >= usage.used


def test_malformed_queries_and_unknown_fields_are_refused(sf):
    with pytest.raises(SalesforceMalformedRequest) as malformed:
        sf.query("SELECT Id FROM Contact WHERE")
    assert malformed.value.content[0]["errorCode"] == "MALFORMED_QUERY"
    with pytest.raises(SalesforceMalformedRequest) as invalid:
        sf.query("SELECT Id, NoSuchField FROM Contact")
    assert invalid.value.content[0]["errorCode"] == "INVALID_FIELD"
    with pytest.raises(SalesforceResourceNotFound):
        sf.Contact.get("003000000000000AAA")


def test_person_accounts_mirror_their_person_contact(sf, control):
    email = f"person.{uuid.uuid4().hex[:10]}@example.com"
    created = sf.Account.create({"LastName": "Person", "FirstName": "Pat", "PersonEmail": email})
    assert created["success"] is True
    assert sf.Account.update(created["id"], {"PersonHasOptedOutOfEmail": True}) == 204
    contact = sf.query(
        f"SELECT Id, HasOptedOutOfEmail, IsPersonAccount FROM Contact WHERE Email = '{email.upper()}'"
    )["records"][0]
    assert contact["IsPersonAccount"] is True
    assert contact["HasOptedOutOfEmail"] is True
    seen = _plain().get(f"{control}/records", params={"email": email}, timeout=10).json()
    assert {record["attributes"]["type"] for record in seen} == {"Account", "Contact"}


def test_expired_session_raises_salesforce_expired_session(sf, control):
    sf.query("SELECT Id FROM Contact LIMIT 1")
    expired = _plain().post(f"{control}/expire-tokens", timeout=10)
    assert expired.status_code == 204
    with pytest.raises(SalesforceExpiredSession) as refused:
        sf.query("SELECT Id FROM Contact LIMIT 1")
    assert refused.value.status == 401
    assert refused.value.content[0]["errorCode"] == "INVALID_SESSION_ID"
