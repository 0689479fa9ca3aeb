//! The Email Opt Out rule: a pure function from one email's members to a decision.
//!
//! - every in-scope member unsubscribed -> opt out (check Email Opt Out);
//! - any in-scope member subscribed -> opt in (the box may be unchecked, only with opt-in evidence);
//! - anything else (cleaned, pending, archived, transactional mixes, or no member in scope) -> no change.
//!
//! Deleted members and members of audiences out of scope do not count.

use std::{collections::HashSet, fmt, str::FromStr};

/// What Salesforce's Email Opt Out should become for one email.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Every in-scope member is unsubscribed: the box must be checked.
    OptOut,
    /// Some in-scope member is subscribed: the box may be unchecked, given opt-in evidence.
    OptIn,
    /// Leave Salesforce as it is.
    NoChange,
}

impl Decision {
    /// The spelling stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OptOut => "opt_out",
            Self::OptIn => "opt_in",
            Self::NoChange => "no_change",
        }
    }

    /// Parses the stored spelling; unknown text reads as no change, the harmless default.
    pub fn from_stored(stored: &str) -> Self {
        match stored {
            "opt_out" => Self::OptOut,
            "opt_in" => Self::OptIn,
            _ => Self::NoChange,
        }
    }
}

/// A Mailchimp member status, plus `Deleted` for a member removed permanently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemberStatus {
    /// `subscribed`.
    Subscribed,
    /// `unsubscribed`.
    Unsubscribed,
    /// `cleaned` (bounced).
    Cleaned,
    /// `pending` (double opt-in not confirmed).
    Pending,
    /// `transactional`.
    Transactional,
    /// `archived`.
    Archived,
    /// No longer in the audience.
    Deleted,
}

impl MemberStatus {
    /// Every status, for tests and exhaustive matching.
    pub const ALL: [Self; 7] = [
        Self::Subscribed,
        Self::Unsubscribed,
        Self::Cleaned,
        Self::Pending,
        Self::Transactional,
        Self::Archived,
        Self::Deleted,
    ];

    /// Mailchimp's spelling, also the stored one.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscribed => "subscribed",
            Self::Unsubscribed => "unsubscribed",
            Self::Cleaned => "cleaned",
            Self::Pending => "pending",
            Self::Transactional => "transactional",
            Self::Archived => "archived",
            Self::Deleted => "deleted",
        }
    }
}

impl fmt::Display for MemberStatus {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A status string that is not one of Mailchimp's.
#[derive(Debug, thiserror::Error)]
#[error("unknown member status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for MemberStatus {
    type Err = UnknownStatus;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
            .ok_or_else(|| UnknownStatus(text.to_owned()))
    }
}

/// One member of the email being decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// The audience (Mailchimp list id).
    pub audience_id: String,
    /// Its current status.
    pub status: MemberStatus,
}

/// The audiences whose members count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every audience of the account.
    All,
    /// Only these audience ids.
    Audiences(HashSet<String>),
}

impl Scope {
    /// `All` for an empty list, else exactly the listed audiences.
    pub fn from_audiences<I, S>(audiences: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let audiences: HashSet<String> = audiences.into_iter().map(Into::into).collect();
        if audiences.is_empty() {
            Self::All
        } else {
            Self::Audiences(audiences)
        }
    }

    /// Whether members of `audience_id` count.
    pub fn contains(&self, audience_id: &str) -> bool {
        match self {
            Self::All => true,
            Self::Audiences(audiences) => audiences.contains(audience_id),
        }
    }
}

/// Rule text when no member counts.
pub const RULE_NO_MEMBERS: &str = "no members in scope";
/// Rule text for an opt-out.
pub const RULE_ALL_UNSUBSCRIBED: &str = "unsubscribed in every audience in scope";
/// Rule text for an opt-in.
pub const RULE_ANY_SUBSCRIBED: &str = "subscribed in at least one audience in scope";
/// Rule text for the remaining mixes.
pub const RULE_MIXED: &str =
    "no member subscribed and not all unsubscribed (cleaned, pending, archived or transactional)";

/// Decides Email Opt Out for one email from all its members, and names the rule that applied.
pub fn decide(members: &[MemberView], in_scope: &Scope) -> (Decision, &'static str) {
    let mut counted = members
        .iter()
        .filter(|member| {
            member.status != MemberStatus::Deleted && in_scope.contains(&member.audience_id)
        })
        .peekable();
    if counted.peek().is_none() {
        return (Decision::NoChange, RULE_NO_MEMBERS);
    }
    let mut all_unsubscribed = true;
    for member in counted {
        match member.status {
            MemberStatus::Subscribed => return (Decision::OptIn, RULE_ANY_SUBSCRIBED),
            MemberStatus::Unsubscribed => {}
            MemberStatus::Cleaned
            | MemberStatus::Pending
            | MemberStatus::Transactional
            | MemberStatus::Archived
            | MemberStatus::Deleted => all_unsubscribed = false,
        }
    }
    if all_unsubscribed {
        (Decision::OptOut, RULE_ALL_UNSUBSCRIBED)
    } else {
        (Decision::NoChange, RULE_MIXED)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn member(audience_id: &str, status: MemberStatus) -> MemberView {
        MemberView {
            audience_id: audience_id.to_owned(),
            status,
        }
    }

    fn scope(audiences: &[&str]) -> Scope {
        Scope::from_audiences(audiences.iter().copied())
    }

    #[test]
    fn no_members_change_nothing() {
        assert_eq!(
            decide(&[], &Scope::All),
            (Decision::NoChange, RULE_NO_MEMBERS)
        );
    }

    #[test]
    fn unsubscribed_everywhere_opts_out() {
        let members = [
            member("a", MemberStatus::Unsubscribed),
            member("b", MemberStatus::Unsubscribed),
        ];
        assert_eq!(
            decide(&members, &Scope::All),
            (Decision::OptOut, RULE_ALL_UNSUBSCRIBED)
        );
    }

    #[test]
    fn one_subscribed_member_opts_in_whatever_the_others_are() {
        for other in MemberStatus::ALL {
            let members = [member("a", other), member("b", MemberStatus::Subscribed)];
            assert_eq!(
                decide(&members, &Scope::All).0,
                Decision::OptIn,
                "with {other}"
            );
        }
    }

    #[test]
    fn single_member_of_each_status_decides_as_the_rule_says() {
        let expected = [
            (MemberStatus::Subscribed, Decision::OptIn),
            (MemberStatus::Unsubscribed, Decision::OptOut),
            (MemberStatus::Cleaned, Decision::NoChange),
            (MemberStatus::Pending, Decision::NoChange),
            (MemberStatus::Transactional, Decision::NoChange),
            (MemberStatus::Archived, Decision::NoChange),
            (MemberStatus::Deleted, Decision::NoChange),
        ];
        for (status, decision) in expected {
            assert_eq!(
                decide(&[member("a", status)], &Scope::All).0,
                decision,
                "for {status}"
            );
        }
    }

    #[test]
    fn unsubscribed_mixed_with_cleaned_pending_archived_or_transactional_changes_nothing() {
        for other in [
            MemberStatus::Cleaned,
            MemberStatus::Pending,
            MemberStatus::Transactional,
            MemberStatus::Archived,
        ] {
            let members = [member("a", MemberStatus::Unsubscribed), member("b", other)];
            assert_eq!(
                decide(&members, &Scope::All),
                (Decision::NoChange, RULE_MIXED),
                "with {other}"
            );
        }
    }

    #[test]
    fn deleted_members_do_not_count() {
        let members = [
            member("a", MemberStatus::Unsubscribed),
            member("b", MemberStatus::Deleted),
        ];
        assert_eq!(decide(&members, &Scope::All).0, Decision::OptOut);
        assert_eq!(
            decide(&[member("a", MemberStatus::Deleted)], &Scope::All),
            (Decision::NoChange, RULE_NO_MEMBERS)
        );
    }

    #[test]
    fn members_of_audiences_out_of_scope_do_not_count() {
        let members = [
            member("a", MemberStatus::Unsubscribed),
            member("b", MemberStatus::Subscribed),
        ];
        assert_eq!(decide(&members, &scope(&["a"])).0, Decision::OptOut);
        assert_eq!(decide(&members, &scope(&["b"])).0, Decision::OptIn);
        assert_eq!(
            decide(&members, &scope(&["c"])),
            (Decision::NoChange, RULE_NO_MEMBERS)
        );
    }

    #[test]
    fn empty_audience_list_means_every_audience() {
        assert_eq!(Scope::from_audiences(Vec::<String>::new()), Scope::All);
    }

    #[test]
    fn statuses_round_trip_through_their_spelling() {
        for status in MemberStatus::ALL {
            assert_eq!(status.as_str().parse::<MemberStatus>().ok(), Some(status));
        }
        assert!("bogus".parse::<MemberStatus>().is_err());
        for decision in [Decision::OptOut, Decision::OptIn, Decision::NoChange] {
            assert_eq!(Decision::from_stored(decision.as_str()), decision);
        }
    }

    fn any_status() -> impl Strategy<Value = MemberStatus> {
        prop::sample::select(MemberStatus::ALL.to_vec())
    }

    fn any_members() -> impl Strategy<Value = Vec<MemberView>> {
        prop::collection::vec(
            (prop::sample::select(vec!["a", "b", "c", "d"]), any_status())
                .prop_map(|(audience_id, status)| member(audience_id, status)),
            0..8,
        )
    }

    fn any_scope() -> impl Strategy<Value = Scope> {
        prop::collection::hash_set(prop::sample::select(vec!["a", "b", "c", "d"]), 0..4)
            .prop_map(Scope::from_audiences)
    }

    proptest! {
        #[test]
        fn opts_out_exactly_when_counted_members_exist_and_all_are_unsubscribed(members in any_members(), in_scope in any_scope()) {
            let counted: Vec<_> = members
                .iter()
                .filter(|member| member.status != MemberStatus::Deleted && in_scope.contains(&member.audience_id))
                .collect();
            let expected = !counted.is_empty() && counted.iter().all(|member| member.status == MemberStatus::Unsubscribed);
            prop_assert_eq!(decide(&members, &in_scope).0 == Decision::OptOut, expected);
        }

        #[test]
        fn opts_in_exactly_when_a_counted_member_is_subscribed(members in any_members(), in_scope in any_scope()) {
            let expected = members
                .iter()
                .any(|member| member.status == MemberStatus::Subscribed && in_scope.contains(&member.audience_id));
            prop_assert_eq!(decide(&members, &in_scope).0 == Decision::OptIn, expected);
        }

        #[test]
        fn adding_an_out_of_scope_member_never_changes_the_decision(members in any_members(), status in any_status()) {
            let in_scope = scope(&["a", "b", "c", "d"]);
            let mut more = members.clone();
            more.push(member("elsewhere", status));
            prop_assert_eq!(decide(&more, &in_scope), decide(&members, &in_scope));
        }

        #[test]
        fn adding_a_deleted_member_never_changes_the_decision(members in any_members(), in_scope in any_scope()) {
            let mut more = members.clone();
            more.push(member("a", MemberStatus::Deleted));
            prop_assert_eq!(decide(&more, &in_scope), decide(&members, &in_scope));
        }

        #[test]
        fn member_order_does_not_matter(members in any_members(), in_scope in any_scope(), seed in any::<u64>()) {
            let mut shuffled = members.clone();
            // A deterministic shuffle driven by the seed.
            let length = shuffled.len();
            for index in (1..length).rev() {
                let other = (seed.wrapping_mul(index as u64 + 7) % (index as u64 + 1)) as usize;
                shuffled.swap(index, other);
            }
            prop_assert_eq!(decide(&shuffled, &in_scope), decide(&members, &in_scope));
            shuffled.reverse();
            prop_assert_eq!(decide(&shuffled, &in_scope), decide(&members, &in_scope));
        }

        #[test]
        fn a_subscribed_member_in_scope_always_opts_in(mut members in any_members(), in_scope in any_scope()) {
            members.push(member("a", MemberStatus::Subscribed));
            let expected = if in_scope.contains("a") { Decision::OptIn } else { decide(&members[..members.len() - 1], &in_scope).0 };
            prop_assert_eq!(decide(&members, &in_scope).0, expected);
        }
    }
}
