//! Deterministic test data: audiences full of members and the matching Salesforce org.
//!
//! People are generated first; each joins one to three audiences (so distinct people are about
//! 65% of memberships), with the address spelled in mixed case differently per audience and in
//! Salesforce. About 60% of people get a Contact, 25% a Lead, some both, ~2% duplicate Contacts,
//! some converted Leads, and ~10% Person Accounts when the org has them.

use std::time::{Duration, Instant};

use fastrand::Rng;

use crate::mailchimp::store::{ListState, MemberRecord, MergeFields, Status};
use crate::salesforce::{NewRecord, SalesforceOrg};

/// Generated timestamps fall in this window, well before any API edit stamps "now".
const START_MICROS: i64 = 1_640_995_200_000_000; // 2022-01-01T00:00:00Z
const END_MICROS: i64 = 1_748_736_000_000_000; // 2025-06-01T00:00:00Z

const FIRST_NAMES: [&str; 40] = [
    "James",
    "Mary",
    "John",
    "Patricia",
    "Robert",
    "Jennifer",
    "Michael",
    "Linda",
    "William",
    "Elizabeth",
    "David",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Amara",
    "Chen",
    "Olga",
    "Ravi",
    "Sofia",
    "Kenji",
    "Fatima",
    "Lars",
    "Ines",
    "Mateo",
    "Aisha",
    "Noah",
    "Zoe",
    "Emeka",
    "Yuki",
    "Priya",
    "Liam",
    "Nora",
    "Omar",
    "Eva",
];
const LAST_NAMES: [&str; 40] = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Okafor",
    "Tanaka",
    "Ivanova",
    "Sharma",
    "Rossi",
    "Nguyen",
    "Kowalski",
    "Larsen",
    "Dubois",
    "Silva",
    "O'Brien",
    "Schmidt",
    "Haddad",
    "Kim",
    "Mensah",
    "Novak",
    "Fischer",
    "Costa",
    "Ali",
    "Berg",
];
const DOMAINS: [&str; 8] = [
    "example.com",
    "example.org",
    "example.net",
    "mail.test",
    "acme.test",
    "globex.test",
    "initech.test",
    "umbrella.test",
];
const COMPANIES: [&str; 8] = [
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark Industries",
    "Wayne Enterprises",
    "Soylent",
];
const AUDIENCE_NAMES: [&str; 6] = [
    "Newsletter",
    "Product Updates",
    "Events",
    "Customers",
    "Webinars",
    "Partners",
];

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GeneratorSettings {
    pub(crate) seed: u64,
    pub(crate) audiences: u32,
    pub(crate) members: u64,
    pub(crate) person_accounts: bool,
}

/// Fills the audiences and the org; returns the audiences with their indexes built.
pub(crate) fn generate(settings: GeneratorSettings, org: &SalesforceOrg) -> Vec<ListState> {
    let mut rng = Rng::with_seed(settings.seed);
    let audience_count = settings.audiences.max(1) as usize;
    let mut lists: Vec<ListState> = (0..audience_count)
        .map(|index| {
            let mut id = format!("{:010x}", rng.u64(..1 << 40));
            while id.len() != 10 {
                id = format!("{:010x}", rng.u64(..1 << 40));
            }
            let name = if index < AUDIENCE_NAMES.len() {
                AUDIENCE_NAMES[index].to_owned()
            } else {
                format!("Audience {}", index + 1)
            };
            let created = START_MICROS - rng.i64(0..365 * 86_400_000_000);
            ListState::new(id, rng.u32(10_000..999_999), name, created)
        })
        .collect();
    // Two lists with the same random id would be a seed-specific surprise; make ids unique.
    for index in 1..lists.len() {
        while lists[..index]
            .iter()
            .any(|other| other.id == lists[index].id)
        {
            lists[index].id = format!("{:010x}", rng.u64(1 << 36..1 << 40));
        }
    }
    let per_list = (settings.members as usize / audience_count) + 16;
    for list in &mut lists {
        list.reserve(per_list);
    }
    let started = Instant::now();
    let mut salesforce_time = Duration::ZERO;
    let mut salesforce_records_made = 0u64;
    let mut records = Vec::with_capacity(4);
    let mut remaining = settings.members;
    let mut person = 0u64;
    let mut chosen = Vec::with_capacity(3);
    while remaining > 0 {
        person += 1;
        let first = FIRST_NAMES[rng.usize(..FIRST_NAMES.len())];
        let last = LAST_NAMES[rng.usize(..LAST_NAMES.len())];
        let domain = DOMAINS[rng.usize(..DOMAINS.len())];
        let local_last: String = last.chars().filter(|c| c.is_ascii_alphabetic()).collect();
        let email = format!("{first}.{local_last}{person}@{domain}").to_lowercase();
        let wanted = match rng.f64() {
            roll if roll < 0.55 => 1,
            roll if roll < 0.91 => 2,
            _ => 3,
        };
        let memberships = (wanted.min(audience_count) as u64).min(remaining) as usize;
        chosen.clear();
        while chosen.len() < memberships {
            let list = rng.usize(..audience_count);
            if !chosen.contains(&list) {
                chosen.push(list);
            }
        }
        let mut unsubscribed_somewhere = false;
        for &list in &chosen {
            let member = member(&mut rng, &email, first, last);
            unsubscribed_somewhere |=
                matches!(member.status, Status::Unsubscribed | Status::Cleaned)
                    || (member.status == Status::Archived
                        && member.archived_from == Status::Unsubscribed);
            lists[list].load(member);
        }
        remaining -= memberships as u64;
        records.clear();
        salesforce_records(
            &mut rng,
            &mut records,
            settings.person_accounts,
            &email,
            first,
            last,
            unsubscribed_somewhere,
        );
        let inserting = Instant::now();
        for record in records.drain(..) {
            org.load(record);
            salesforce_records_made += 1;
        }
        salesforce_time += inserting.elapsed();
    }
    for list in &mut lists {
        list.finish_load();
    }
    tracing::info!(
        members = settings.members,
        people = person,
        salesforce_records = salesforce_records_made,
        elapsed_ms = started.elapsed().as_millis() as u64,
        salesforce_insert_ms = salesforce_time.as_millis() as u64,
        "generated sandbox data"
    );
    lists
}

fn member(rng: &mut Rng, email: &str, first: &str, last: &str) -> MemberRecord {
    let status = match rng.f64() {
        roll if roll < 0.85 => Status::Subscribed,
        roll if roll < 0.93 => Status::Unsubscribed,
        roll if roll < 0.95 => Status::Cleaned,
        roll if roll < 0.97 => Status::Pending,
        roll if roll < 0.985 => Status::Archived,
        _ => Status::Transactional,
    };
    let merge_fields = MergeFields::new(first, last);
    let mut member = MemberRecord::new(vary_case(rng, email), status, merge_fields);
    if status == Status::Archived {
        member.archived_from = if rng.f64() < 0.7 {
            Status::Subscribed
        } else {
            Status::Unsubscribed
        };
    }
    let signup = rng.i64(START_MICROS..END_MICROS - 1_000_000);
    let changed = rng.i64(signup..END_MICROS);
    // Whole seconds, as the real API reports them, plus a sub-second part for a stable order.
    member.timestamp_signup = if rng.f64() < 0.6 {
        signup / 1_000_000 * 1_000_000
    } else {
        0
    };
    member.timestamp_opt = if status == Status::Subscribed || rng.bool() {
        signup / 1_000_000 * 1_000_000
    } else {
        0
    };
    member.last_changed = changed;
    if member.timestamp_signup != 0 {
        member.ip_signup = format!("198.51.100.{}", rng.u8(1..255));
        member.source = "Hosted Signup Form";
    } else {
        member.source = if rng.bool() {
            "Import"
        } else {
            "API - Generic"
        };
    }
    if status == Status::Unsubscribed {
        member.unsubscribe_reason = "N/A (Unsubscribed by the member)".to_owned();
    }
    member.member_rating = rng.u8(1..=5);
    member.email_type = if rng.f64() < 0.05 { "text" } else { "html" };
    member
}

/// The same address as people type it: mostly lower case, sometimes capitalized or shouted.
fn vary_case(rng: &mut Rng, email: &str) -> String {
    match rng.f64() {
        roll if roll < 0.70 => email.to_owned(),
        roll if roll < 0.90 => {
            let mut capitalize = true;
            email
                .chars()
                .map(|c| {
                    let out = if capitalize {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    };
                    capitalize = matches!(c, '.' | '@');
                    out
                })
                .collect()
        }
        roll if roll < 0.95 => email.to_ascii_uppercase(),
        _ => {
            let (local, domain) = email.split_once('@').unwrap_or((email, ""));
            format!("{}@{}", local, domain.to_ascii_uppercase())
        }
    }
}

/// The Salesforce records of one person, pushed to `records`.
fn salesforce_records(
    rng: &mut Rng,
    records: &mut Vec<NewRecord>,
    person_accounts: bool,
    email: &str,
    first: &str,
    last: &str,
    unsubscribed: bool,
) {
    let opt_out_share = if unsubscribed { 0.4 } else { 0.02 };
    let opted_out = |rng: &mut Rng| rng.f64() < opt_out_share;
    let contact = |rng: &mut Rng, opted_out: bool| NewRecord::Contact {
        email: vary_case(rng, email),
        first_name: first.to_owned(),
        last_name: last.to_owned(),
        opted_out,
    };
    let lead = |rng: &mut Rng, opted_out: bool, converted: bool| NewRecord::Lead {
        email: vary_case(rng, email),
        first_name: first.to_owned(),
        last_name: last.to_owned(),
        company: COMPANIES[rng.usize(..COMPANIES.len())].to_owned(),
        opted_out,
        converted,
    };
    if person_accounts && rng.f64() < 0.10 {
        let record = NewRecord::PersonAccount {
            email: vary_case(rng, email),
            first_name: first.to_owned(),
            last_name: last.to_owned(),
            opted_out: opted_out(rng),
        };
        records.push(record);
        return;
    }
    let roll = rng.f64();
    if roll < 0.60 {
        let out = opted_out(rng);
        records.push(contact(rng, out));
        if rng.f64() < 0.035 {
            // A duplicate Contact, as orgs without duplicate rules accumulate.
            let out = opted_out(rng);
            records.push(contact(rng, out));
        }
        if rng.f64() < 0.08 {
            // The same person also came in as a Lead.
            let out = opted_out(rng);
            records.push(lead(rng, out, false));
        }
    } else if roll < 0.85 {
        let converted = rng.f64() < 0.10;
        let out = opted_out(rng);
        records.push(lead(rng, out, converted));
        if converted {
            // Conversion made a Contact from the Lead.
            records.push(contact(rng, out));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::salesforce::OrgSettings;

    fn settings(seed: u64) -> GeneratorSettings {
        GeneratorSettings {
            seed,
            audiences: 3,
            members: 3000,
            person_accounts: true,
        }
    }

    #[test]
    fn generates_the_same_audiences_from_the_same_seed() {
        let org = SalesforceOrg::new(OrgSettings {
            person_accounts: true,
            daily_api_budget: 1000,
        });
        let first = generate(settings(7), &org);
        let second = generate(settings(7), &org);
        let ids = |lists: &[ListState]| {
            lists
                .iter()
                .map(|l| (l.id.clone(), l.total()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&first), ids(&second));
        assert_ne!(ids(&first), ids(&generate(settings(8), &org)));
    }

    #[test]
    fn generates_the_requested_memberships_mostly_subscribed() {
        let org = SalesforceOrg::new(OrgSettings {
            person_accounts: false,
            daily_api_budget: 1000,
        });
        let lists = generate(settings(1), &org);
        let total: u64 = lists.iter().map(ListState::total).sum();
        assert_eq!(total, 3000);
        let subscribed: u64 = lists.iter().map(|l| l.count(Status::Subscribed)).sum();
        assert!((2300..2800).contains(&subscribed), "{subscribed}");
        assert!(lists.iter().all(|list| list.id.len() == 10));
    }
}
