//! What an upstream's rate-limit headers say of its headroom, so that a model group steers away
//! from a deployment before it answers 429: when a response says no requests or no tokens remain,
//! the deployment is out until the reset the same headers give.
//!
//! Read: OpenAI's (and Azure's) `x-ratelimit-remaining-requests` / `-tokens` with
//! `x-ratelimit-reset-requests` / `-tokens` (Go durations: `1s`, `6m0s`, `20ms`), and Anthropic's
//! `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-remaining` with `-reset`
//! (an RFC 3339 time). A reset further than [`MAX_WAIT`] away counts as `MAX_WAIT`: a header must
//! not take a deployment out for good.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use reqwest::header::HeaderMap;
use tokio::time::Instant;

/// The longest a deployment is taken out on its headers' word.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// An upstream's headroom, from the last response that spoke of it.
#[derive(Debug, Default)]
pub struct Headroom {
    exhausted_until: Mutex<Option<Instant>>,
}

/// The limits a response may report, each as its remaining and its reset header.
const OPENAI: &[(&str, &str)] = &[
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
];
const ANTHROPIC: &[(&str, &str)] = &[
    ("anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset"),
    ("anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset"),
    ("anthropic-ratelimit-input-tokens-remaining", "anthropic-ratelimit-input-tokens-reset"),
    ("anthropic-ratelimit-output-tokens-remaining", "anthropic-ratelimit-output-tokens-reset"),
];

impl Headroom {
    /// Reads a response's headers: out until the latest reset of a limit with nothing remaining;
    /// a response whose limits all have some left puts the upstream back.
    pub fn note(&self, headers: &HeaderMap) {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let mut spoke = false;
        let mut wait: Option<Duration> = None;
        let limits = OPENAI.iter().map(|l| (l, false)).chain(ANTHROPIC.iter().map(|l| (l, true)));
        for ((remaining, reset), anthropic) in limits {
            let Some(left) = header(remaining).and_then(|v| v.parse::<u64>().ok()) else { continue };
            spoke = true;
            if left > 0 {
                continue;
            }
            let until = header(reset).and_then(|v| if anthropic { until_rfc3339(v) } else { go_duration(v) });
            // Nothing left and no reset given: out for a second, then asked again.
            let until = until.unwrap_or(Duration::from_secs(1)).min(MAX_WAIT);
            wait = Some(wait.map_or(until, |w| w.max(until)));
        }
        if !spoke {
            return;
        }
        if let Ok(mut exhausted) = self.exhausted_until.lock() {
            *exhausted = wait.map(|wait| Instant::now() + wait);
        }
    }

    /// Until when the upstream said it has no headroom, if that is still ahead.
    pub fn exhausted_until(&self, now: Instant) -> Option<Instant> {
        let exhausted = *self.exhausted_until.lock().ok()?;
        exhausted.filter(|until| *until > now)
    }
}

/// A Go duration (`1s`, `6m0s`, `1h2m3.5s`, `20ms`).
fn go_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        let number: f64 = number.parse().ok()?;
        let unit = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit);
        total += number
            * match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 0.001,
                "us" | "µs" => 0.000_001,
                "ns" => 0.000_000_001,
                _ => return None,
            };
        rest = next;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// How long from now until an RFC 3339 time in UTC (`2026-12-07T03:00:00Z`, fractions allowed);
/// zero when it has passed.
fn until_rfc3339(text: &str) -> Option<Duration> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let time = time.split('.').next()?;
    let mut time = time.split(':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (time.next()??, time.next()??, time.next()??);
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second;
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()?;
    Some(Duration::from_secs(u64::try_from(seconds - now).unwrap_or(0)))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (reqwest::header::HeaderName::from_static(name), value.parse().unwrap()))
            .collect()
    }

    #[test]
    fn go_durations_and_rfc3339_times_read() {
        assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("1h2m3.5s"), Some(Duration::from_secs_f64(3723.5)));
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("soon"), None);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(until_rfc3339("2000-01-01T00:00:00Z"), Some(Duration::ZERO), "passed");
        let later = until_rfc3339("2999-01-01T00:00:00.5Z").unwrap();
        assert!(later > Duration::from_secs(86_400 * 365 * 900), "{later:?}");
    }

    #[test]
    fn nothing_remaining_takes_the_upstream_out_until_the_reset_and_headroom_puts_it_back() {
        let headroom = Headroom::default();
        let now = Instant::now();
        headroom.note(&headers(&[("x-ratelimit-remaining-requests", "12".into())]));
        assert_eq!(headroom.exhausted_until(now), None);
        headroom.note(&headers(&[
            ("x-ratelimit-remaining-requests", "3".into()),
            ("x-ratelimit-remaining-tokens", "0".into()),
            ("x-ratelimit-reset-tokens", "30s".into()),
        ]));
        let until = headroom.exhausted_until(now).unwrap();
        assert!(until > now + Duration::from_secs(29) && until <= Instant::now() + Duration::from_secs(30));
        // A response that says nothing of its limits changes nothing; one with headroom does.
        headroom.note(&HeaderMap::new());
        assert!(headroom.exhausted_until(now).is_some());
        headroom.note(&headers(&[("x-ratelimit-remaining-tokens", "5000".into())]));
        assert_eq!(headroom.exhausted_until(now), None);
    }

    #[test]
    fn anthropics_reset_is_a_time_and_a_far_one_is_bounded() {
        let headroom = Headroom::default();
        headroom.note(&headers(&[
            ("anthropic-ratelimit-requests-remaining", "0".into()),
            ("anthropic-ratelimit-requests-reset", "2999-01-01T00:00:00Z".into()),
        ]));
        let until = headroom.exhausted_until(Instant::now()).unwrap();
        assert!(until <= Instant::now() + MAX_WAIT, "bounded");
        assert!(until > Instant::now() + MAX_WAIT - Duration::from_secs(5));
    }
}
