//! DTMF as RFC 4733 telephone events: digits to event codes and back, received reports
//! collapsed to one key press each, and the digits waiting to be sent.

use std::time::{Duration, Instant};

use crate::limits;
use crate::types::DtmfError;

/// The RFC 4733 event code of a DTMF digit (`0`-`9`, `*` = 10, `#` = 11, `A`-`D` = 12-15).
pub(crate) fn event_code(digit: char) -> Option<u8> {
    match digit {
        '0'..='9' => u8::try_from(u32::from(digit) - u32::from('0')).ok(),
        '*' => Some(10),
        '#' => Some(11),
        'A'..='D' => u8::try_from(u32::from(digit) - u32::from('A') + 12).ok(),
        _ => None,
    }
}

/// The digit of an RFC 4733 event code; `None` for events that are no DTMF digit (flash, ...).
pub(crate) fn digit_of(code: u8) -> Option<char> {
    match code {
        0..=9 => char::from_digit(u32::from(code), 10),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => char::from_u32(u32::from('A') + u32::from(code) - 12),
        _ => None,
    }
}

/// The event codes of `digits`, checked: only `0-9 * # A-D`, at least one and at most
/// [`limits::MAX_DTMF_DIGITS`]. Lower-case `a`-`d` are taken as their upper-case digits.
pub(crate) fn parse_digits(digits: &str) -> Result<Vec<u8>, DtmfError> {
    let count = digits.chars().count();
    if count == 0 {
        return Err(DtmfError::Empty);
    }
    if count > limits::MAX_DTMF_DIGITS {
        return Err(DtmfError::TooLong {
            len: count,
            max: limits::MAX_DTMF_DIGITS,
        });
    }
    digits
        .chars()
        .map(|c| event_code(c.to_ascii_uppercase()).ok_or(DtmfError::InvalidDigit(c)))
        .collect()
}

/// One key press, as reported once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Press {
    pub digit: char,
    pub duration: Duration,
}

/// One telephone-event report as str0m hands it out: the event's RTP timestamp (the same in
/// every packet of one press) and the report's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Report {
    pub rtp_time: u64,
    pub code: u8,
    pub end: bool,
    pub duration: Duration,
}

/// The press being heard, not yet ended.
#[derive(Debug, Clone, Copy)]
struct Pending {
    key: (u64, u8),
    duration: Duration,
    last_heard: Instant,
}

/// Turns a stream of RFC 4733 reports into one [`Press`] per key press.
///
/// A press is identified by its RTP timestamp and event code. It is reported on its first end
/// report; if every end report is lost, when another press starts or when nothing was heard of
/// it for [`limits::DTMF_END_TIMEOUT`]. Its later reports (the three end retransmissions,
/// duplicates, late reordered updates) find it among the recently reported presses and are
/// dropped.
#[derive(Debug, Default)]
pub(crate) struct DtmfReceiver {
    pending: Option<Pending>,
    reported: heapless::Deque<(u64, u8), { limits::DTMF_REMEMBERED_PRESSES }>,
}

impl DtmfReceiver {
    /// Takes one report; gives the presses it completes (an unfinished earlier one, this one).
    pub fn on_report(&mut self, r: Report, now: Instant) -> heapless::Vec<Press, 2> {
        let mut out = heapless::Vec::new();
        let key = (r.rtp_time, r.code);
        if self.reported.iter().any(|k| *k == key) {
            return out;
        }
        let mut duration = r.duration;
        match self.pending {
            Some(p) if p.key == key => duration = duration.max(p.duration),
            Some(_) => {
                if let Some(press) = self.finish() {
                    let _ = out.push(press);
                }
            }
            None => {}
        }
        self.pending = Some(Pending {
            key,
            duration,
            last_heard: now,
        });
        if r.end {
            if let Some(press) = self.finish() {
                let _ = out.push(press);
            }
        }
        out
    }

    /// When an unfinished press counts as ended without its end report.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending
            .map(|p| p.last_heard + limits::DTMF_END_TIMEOUT)
    }

    /// The unfinished press, if nothing was heard of it for [`limits::DTMF_END_TIMEOUT`].
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Press> {
        if self.deadline().is_some_and(|d| d <= now) {
            self.finish()
        } else {
            None
        }
    }

    /// Reports the pending press and remembers it (the oldest remembered one gives way).
    fn finish(&mut self) -> Option<Press> {
        let p = self.pending.take()?;
        if self.reported.is_full() {
            self.reported.pop_front();
        }
        let _ = self.reported.push_back(p.key);
        Some(Press {
            digit: digit_of(p.key.1)?,
            duration: p.duration,
        })
    }
}

/// Digits waiting to be sent, one tone at a time.
#[derive(Debug, Default)]
pub(crate) struct DtmfSender {
    queue: heapless::Deque<u8, { limits::MAX_DTMF_DIGITS }>,
}

impl DtmfSender {
    /// Queues event codes; refuses all of them if they do not fit behind the queued ones.
    pub fn queue(&mut self, codes: &[u8]) -> Result<(), DtmfError> {
        let free = self.queue.capacity() - self.queue.len();
        if codes.len() > free {
            return Err(DtmfError::QueueFull {
                queued: self.queue.len(),
                max: limits::MAX_DTMF_DIGITS,
            });
        }
        for c in codes {
            let _ = self.queue.push_back(*c);
        }
        Ok(())
    }

    /// The next event code to play.
    pub fn next(&mut self) -> Option<u8> {
        self.queue.pop_front()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a real Instant as the tests' time base
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn report(rtp_time: u64, code: u8, end: bool, ms: u64) -> Report {
        Report {
            rtp_time,
            code,
            end,
            duration: MS * ms as u32,
        }
    }

    /// The reports a sender makes for one press: updates every 20 ms, then three end reports.
    fn press(rtp_time: u64, code: u8) -> Vec<Report> {
        let mut v: Vec<Report> = (1..5)
            .map(|i| report(rtp_time, code, false, 20 * i))
            .collect();
        v.extend([report(rtp_time, code, true, 100); 3]);
        v
    }

    fn feed(rx: &mut DtmfReceiver, reports: &[Report], t0: Instant) -> Vec<Press> {
        reports
            .iter()
            .enumerate()
            .flat_map(|(i, r)| rx.on_report(*r, t0 + MS * (i as u32 * 20)))
            .collect()
    }

    fn digits(presses: &[Press]) -> String {
        presses.iter().map(|p| p.digit).collect()
    }

    #[test]
    fn digits_and_event_codes_map_both_ways() {
        for (c, code) in "0123456789*#ABCD".chars().zip(0u8..) {
            assert_eq!(event_code(c), Some(code));
            assert_eq!(digit_of(code), Some(c));
        }
        assert_eq!(event_code('E'), None);
        assert_eq!(digit_of(16), None);
    }

    #[test]
    fn digits_are_validated_with_typed_errors() {
        assert_eq!(parse_digits("12#a"), Ok(vec![1, 2, 11, 12]));
        assert_eq!(parse_digits(""), Err(DtmfError::Empty));
        assert_eq!(parse_digits("12x"), Err(DtmfError::InvalidDigit('x')));
        let long = "1".repeat(limits::MAX_DTMF_DIGITS + 1);
        assert!(matches!(
            parse_digits(&long),
            Err(DtmfError::TooLong { .. })
        ));
    }

    #[test]
    fn end_retransmissions_and_duplicates_are_one_press() {
        let mut rx = DtmfReceiver::default();
        let mut reports = press(960, 5);
        reports.extend(press(960, 5));
        let got = feed(&mut rx, &reports, Instant::now());
        assert_eq!(
            got,
            [Press {
                digit: '5',
                duration: MS * 100
            }]
        );
        assert_eq!(rx.deadline(), None);
    }

    #[test]
    fn only_one_end_report_left_is_still_one_press() {
        let mut rx = DtmfReceiver::default();
        let got = feed(&mut rx, &[report(0, 1, true, 100)], Instant::now());
        assert_eq!(digits(&got), "1");
    }

    #[test]
    fn lost_end_reports_are_reported_when_the_next_press_starts() {
        let mut rx = DtmfReceiver::default();
        let mut reports: Vec<Report> = press(0, 1).into_iter().filter(|r| !r.end).collect();
        reports.extend(press(8000, 2));
        let got = feed(&mut rx, &reports, Instant::now());
        assert_eq!(digits(&got), "12");
        assert_eq!(got.first().map(|p| p.duration), Some(MS * 80));
    }

    #[test]
    fn lost_end_reports_are_reported_after_the_end_timeout() {
        let mut rx = DtmfReceiver::default();
        let t0 = Instant::now();
        let reports: Vec<Report> = press(0, 7).into_iter().filter(|r| !r.end).collect();
        assert!(feed(&mut rx, &reports, t0).is_empty());
        let deadline = rx.deadline().unwrap_or(t0);
        assert_eq!(rx.handle_timeout(deadline - MS), None);
        assert_eq!(rx.handle_timeout(deadline).map(|p| p.digit), Some('7'));
        // The end reports arriving very late do not make a second press.
        assert!(feed(&mut rx, &press(0, 7), deadline).is_empty());
    }

    #[test]
    fn reordered_reports_of_two_presses_give_each_digit_once_in_order() {
        let mut rx = DtmfReceiver::default();
        let (a, b) = (press(0, 3), press(1360, 4));
        // The end reports of 3 overtaken by the start of 4.
        let mut reports: Vec<Report> = a.iter().copied().filter(|r| !r.end).collect();
        reports.extend(b.iter().take(2));
        reports.extend(a.iter().filter(|r| r.end));
        reports.extend(b.iter().skip(2));
        let got = feed(&mut rx, &reports, Instant::now());
        assert_eq!(digits(&got), "34");
    }

    #[test]
    fn a_late_update_after_the_end_is_dropped() {
        let mut rx = DtmfReceiver::default();
        let mut reports = press(0, 9);
        reports.swap(0, 5);
        let got = feed(&mut rx, &reports, Instant::now());
        assert_eq!(digits(&got), "9");
    }

    #[test]
    fn the_same_digit_twice_is_two_presses() {
        let mut rx = DtmfReceiver::default();
        let mut reports = press(0, 1);
        reports.extend(press(1360, 1));
        assert_eq!(digits(&feed(&mut rx, &reports, Instant::now())), "11");
    }

    #[test]
    fn the_sender_queue_is_bounded_and_refuses_all_or_nothing() {
        let mut tx = DtmfSender::default();
        assert!(tx.queue(&[1; limits::MAX_DTMF_DIGITS]).is_ok());
        assert!(matches!(tx.queue(&[2]), Err(DtmfError::QueueFull { .. })));
        assert_eq!(tx.next(), Some(1));
        assert!(tx.queue(&[2]).is_ok());
        let rest: Vec<u8> = std::iter::from_fn(|| tx.next()).collect();
        assert_eq!(rest.len(), limits::MAX_DTMF_DIGITS);
        assert_eq!(rest.last(), Some(&2));
        assert_eq!(tx.next(), None);
    }
}
