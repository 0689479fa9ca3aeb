"""The baseline of the benchmark: the script a Salesforce admin might write instead of optout-sync.

It uses the official clients unchanged (mailchimp-marketing, simple-salesforce), pages every member
of every audience, and for each person unsubscribed everywhere queries Salesforce and updates the
records one by one. It applies the same rule as optout-sync (all members unsubscribed -> opt out;
converted Leads skipped), so both do the same writes and only the method differs.

Usage: python baseline.py SANDBOX_INFO.json   (the sandbox's announcement line)
Prints one JSON line: {"elapsed_s", "members_read", "optout_emails", "records_updated", ...}.
"""

import json
import sys
import time

import mailchimp_marketing as MailchimpMarketing
import requests
from simple_salesforce import Salesforce


def quote(value):
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def main():
    with open(sys.argv[1]) as handle:
        info = json.load(handle)
    started = time.monotonic()

    mailchimp = MailchimpMarketing.Client({"api_key": info["mailchimp_api_key"]})
    mailchimp.api_client.host = info["mailchimp_url"]
    statuses = {}
    members_read = 0
    lists = mailchimp.lists.get_all_lists(count=1000, fields=["lists.id"])["lists"]
    for audience in lists:
        offset = 0
        while True:
            page = mailchimp.lists.get_list_members_info(
                audience["id"],
                count=1000,
                offset=offset,
                fields=["members.email_address", "members.status", "total_items"],
            )
            for member in page["members"]:
                email = member["email_address"].strip().lower()
                statuses.setdefault(email, []).append(member["status"])
            members_read += len(page["members"])
            offset += len(page["members"])
            if not page["members"] or offset >= page["total_items"]:
                break
    opted_out = sorted(
        email for email, seen in statuses.items() if all(status == "unsubscribed" for status in seen)
    )
    paged_s = time.monotonic() - started

    session = requests.Session()
    # requests ignores session.verify when REQUESTS_CA_BUNDLE is set; the sandbox has its own CA.
    session.trust_env = False
    session.verify = info["salesforce_ca_file"]
    token = session.post(
        f"{info['salesforce_login_url']}/services/oauth2/token",
        data={
            "grant_type": "client_credentials",
            "client_id": info["salesforce_client_id"],
            "client_secret": info["salesforce_client_secret"],
        },
        timeout=30,
    )
    token.raise_for_status()
    token = token.json()
    salesforce = Salesforce(
        instance_url=token["instance_url"],
        session_id=token["access_token"],
        session=session,
        version="59.0",
    )

    updated = 0
    for email in opted_out:
        for sobject, scope in (("Contact", ""), ("Lead", " AND IsConverted = false")):
            result = salesforce.query(
                f"SELECT Id, HasOptedOutOfEmail FROM {sobject} WHERE Email = {quote(email)}{scope}"
            )
            for record in result["records"]:
                if not record["HasOptedOutOfEmail"]:
                    getattr(salesforce, sobject).update(record["Id"], {"HasOptedOutOfEmail": True})
                    updated += 1

    print(
        json.dumps(
            {
                "elapsed_s": time.monotonic() - started,
                "mailchimp_s": paged_s,
                "members_read": members_read,
                "optout_emails": len(opted_out),
                "records_updated": updated,
            }
        )
    )


if __name__ == "__main__":
    main()
