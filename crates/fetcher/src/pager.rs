//! Offset paging over a result set that shrinks while it is read.
//!
//! A sync run lists members with `since_last_changed <= last_changed < before_last_changed = run_start`,
//! sorted by `last_changed`. A member changed during the run gets `last_changed > run_start` and leaves
//! the set; nobody can enter it. Each departure shifts every later member one position left, so plain
//! `offset += page_len` would step over one member per departure — and a skipped member may carry an
//! opt-out. The pager keeps a *read prefix*: a position below which every member of the current set is
//! known to have been read. `total_items` of each response says how many members left since the
//! previous response. Departures since the previous page may have come from the read prefix, so it
//! shrinks by that many; the next offset also starts that many members early, on the guess that as many
//! leave before the next page. If more leave than guessed, the page lands past the read prefix and the
//! pager goes back to the prefix: members are re-read (harmless: consumers ignore stale snapshots) but
//! never skipped.
//!
//! The brief's `next = offset + page_len - (previous_total - current_total)` alone is not enough: it
//! corrects for departures *before* the next request using the count seen before *this* one, so a burst
//! of departures from the already-read prefix right before a page still skips members (see
//! `brief_formula_alone_skips_a_member`). This pager is that formula plus the correction.

/// What to do after a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Request the next page at this offset.
    Next(u64),
    /// Every member still in the set has been read.
    Done,
}

/// Offset paging state for one audience's listing; pure, so it can be property tested.
#[derive(Clone, Debug)]
pub struct Pager {
    page_size: u64,
    /// Every member at a position below this, in the latest known set, has been read.
    read_prefix: u64,
    /// `total_items` of the previous response; `None` before the first page.
    last_total: Option<u64>,
    /// Departures seen between the two latest responses: our guess for the next gap.
    margin: u64,
}

impl Pager {
    /// A pager for pages of `page_size` members (at least 1).
    pub fn new(page_size: u32) -> Self {
        Self {
            page_size: u64::from(page_size.max(1)),
            read_prefix: 0,
            last_total: None,
            margin: 0,
        }
    }

    /// The offset of the next request.
    pub fn offset(&self) -> u64 {
        // Start early by the departures we expect, but always make some progress past the prefix.
        let margin = self.margin.min(self.page_size - 1);
        self.read_prefix.saturating_sub(margin)
    }

    /// Records the page read at `offset` (which must be [`Pager::offset`]) holding `page_len` members
    /// of `total` matching ones, and says what to read next.
    pub fn record(&mut self, offset: u64, page_len: u64, total: u64) -> Step {
        // A growing set cannot hide a member from us (growth only shifts members right), so it
        // counts as no departure.
        let departed = self.last_total.map_or(0, |last| last.saturating_sub(total));
        self.last_total = Some(total);
        self.margin = departed;
        // Departures may all have come from the read prefix.
        let safe_prefix = self.read_prefix.saturating_sub(departed);
        self.read_prefix = if offset <= safe_prefix {
            safe_prefix.max(offset + page_len)
        } else {
            // The page starts past what is known to be read: the members in between may have moved
            // below the page. Forget the page (it was published; reading it again is harmless).
            safe_prefix
        };
        if self.read_prefix >= total {
            Step::Done
        } else {
            Step::Next(self.offset())
        }
    }

    /// An upper bound on the number of requests for a listing of `total` members: each request
    /// either moves the prefix forward or follows a departure, and departures are at most `total`.
    pub fn max_requests(&self, total: u64) -> u64 {
        (total / self.page_size + 2) * 4 + total * 2
    }
}

/// The brief's offset formula on its own: `offset + page_len - (previous_total - current_total)`,
/// never below 0. Kept for the record; [`Pager`] adds the correction it lacks.
pub fn drift_adjusted_offset(
    offset: u64,
    page_len: u64,
    previous_total: u64,
    current_total: u64,
) -> u64 {
    (offset + page_len).saturating_sub(previous_total.saturating_sub(current_total))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// A listing that shrinks between requests: `departures[i]` picks members to remove before
    /// request `i` (each a fraction of the current set's length, so removals land anywhere).
    struct Listing {
        members: Vec<u32>,
    }

    impl Listing {
        fn page(&self, offset: u64, count: u64) -> (Vec<u32>, u64) {
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(self.members.len());
            let end = start
                .saturating_add(usize::try_from(count).unwrap_or(usize::MAX))
                .min(self.members.len());
            (self.members[start..end].to_vec(), self.members.len() as u64)
        }

        fn remove_at_fraction(&mut self, fraction: f64) -> Option<u32> {
            if self.members.is_empty() {
                return None;
            }
            let index = ((self.members.len() as f64) * fraction) as usize;
            Some(self.members.remove(index.min(self.members.len() - 1)))
        }
    }

    /// Runs the pager over a listing of `size` members; before request `i` the members at the
    /// fractions `departures[i]` leave. Returns (members read, members that never left, requests).
    fn simulate(
        size: u32,
        page_size: u32,
        departures: &[Vec<f64>],
    ) -> (BTreeSet<u32>, BTreeSet<u32>, u64) {
        let mut listing = Listing {
            members: (0..size).collect(),
        };
        let mut pager = Pager::new(page_size);
        let mut read = BTreeSet::new();
        let mut requests = 0_u64;
        let max_requests = pager.max_requests(u64::from(size));
        let mut offset = pager.offset();
        loop {
            if let Some(batch) = departures.get(requests as usize) {
                for fraction in batch {
                    listing.remove_at_fraction(*fraction);
                }
            }
            let (page, total) = listing.page(offset, u64::from(page_size));
            requests += 1;
            assert!(
                requests <= max_requests,
                "paging did not converge after {requests} requests"
            );
            read.extend(page.iter().copied());
            match pager.record(offset, page.len() as u64, total) {
                Step::Done => break,
                Step::Next(next) => offset = next,
            }
        }
        let stayed = listing.members.iter().copied().collect();
        (read, stayed, requests)
    }

    #[test]
    fn reads_every_member_of_a_stable_listing_in_exact_pages() {
        let (read, stayed, requests) = simulate(10, 3, &[]);
        assert_eq!(read, stayed);
        assert_eq!(requests, 4);
    }

    #[test]
    fn finishes_an_empty_listing_with_one_request() {
        let (read, _, requests) = simulate(0, 1000, &[]);
        assert!(read.is_empty());
        assert_eq!(requests, 1);
    }

    #[test]
    fn rereads_a_member_shifted_below_the_page_by_a_departure_from_the_read_prefix() {
        // a..f in pages of 2; `a` (already read) leaves before the second request, so `c` moves to
        // position 1, below the second page's offset.
        let (read, stayed, _) = simulate(6, 2, &[vec![], vec![0.0]]);
        assert!(
            stayed.is_subset(&read),
            "skipped {:?}",
            stayed.difference(&read).collect::<Vec<_>>()
        );
    }

    #[test]
    fn brief_formula_alone_skips_a_member() {
        // Same scenario as above, paged with the formula only.
        let mut members: Vec<u32> = (0..6).collect();
        let mut read = BTreeSet::new();
        let (mut offset, mut previous_total) = (0_usize, members.len() as u64);
        for request in 0.. {
            if request == 1 {
                members.remove(0);
            }
            let page: Vec<u32> = members.iter().skip(offset).take(2).copied().collect();
            let total = members.len() as u64;
            if page.is_empty() {
                break;
            }
            read.extend(page.iter().copied());
            offset = drift_adjusted_offset(offset as u64, page.len() as u64, previous_total, total)
                as usize;
            previous_total = total;
        }
        assert!(
            !read.contains(&2),
            "the formula alone happened to read member 2"
        );
    }

    #[test]
    fn makes_progress_under_steady_departures_smaller_than_a_page() {
        let departures: Vec<Vec<f64>> = (0..200).map(|_| vec![0.0, 0.0]).collect();
        let (read, stayed, requests) = simulate(1000, 100, &departures);
        assert!(stayed.is_subset(&read));
        assert!(requests < 40, "took {requests} requests");
    }

    proptest! {
        #[test]
        fn never_skips_a_member_that_stays_in_the_listing(
            size in 0_u32..400,
            page_size in 1_u32..50,
            departures in proptest::collection::vec(
                proptest::collection::vec(0.0_f64..1.0, 0..6), 0..60),
        ) {
            let (read, stayed, _) = simulate(size, page_size, &departures);
            let skipped: Vec<_> = stayed.difference(&read).collect();
            prop_assert!(skipped.is_empty(), "skipped {:?}", skipped);
        }

        #[test]
        fn never_skips_a_member_when_departures_hit_the_read_prefix(
            size in 0_u32..300,
            page_size in 1_u32..40,
            departures in proptest::collection::vec(
                proptest::collection::vec(0.0_f64..0.3, 0..10), 0..60),
        ) {
            let (read, stayed, _) = simulate(size, page_size, &departures);
            let skipped: Vec<_> = stayed.difference(&read).collect();
            prop_assert!(skipped.is_empty(), "skipped {:?}", skipped);
        }
    }
}
