//! Durations (`30s`, `10m`, `72h`), wave sizes (`3`, `25%`) and failure budgets.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// A YAML scalar that may be written as a number or as text (`3` or `25%`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// Written as an integer.
    Int(i64),
    /// Written as text.
    Text(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Int(n) => write!(f, "{n}"),
            Scalar::Text(s) => f.write_str(s),
        }
    }
}

/// Why a value could not be read; the message says what to write instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(pub String);

/// Parse a duration: one or more `<number><unit>` parts, units `ms`, `s`,
/// `m`, `h`, `d` (`90s`, `10m`, `1h30m`). A bare `0` is zero.
pub fn parse_duration(raw: &Scalar) -> Result<Duration, UnitError> {
    let text = match raw {
        Scalar::Int(0) => return Ok(Duration::ZERO),
        Scalar::Int(n) => {
            return Err(UnitError(format!(
                "`{n}` has no unit; write it as `{n}s`, `{n}m` or `{n}h`"
            )));
        }
        Scalar::Text(t) => t.trim(),
    };
    let bad = || {
        UnitError(format!(
            "`{text}` is not a duration; write a number and a unit, like `30s`, `10m`, `72h` or `1h30m`"
        ))
    };
    if text.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let number: u128 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let millis_per = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = total
            .checked_add(number.checked_mul(millis_per).ok_or_else(bad)?)
            .ok_or_else(bad)?;
    }
    let millis = u64::try_from(total).map_err(|_| bad())?;
    Ok(Duration::from_millis(millis))
}

/// Render a duration the way an operator would write it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = ms;
    for (unit, per) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if rest >= per {
            out.push_str(&format!("{}{unit}", rest / per));
            rest %= per;
        }
    }
    out
}

/// A share of something: a count of hosts or a percentage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    /// A number of hosts.
    Count(u64),
    /// A percentage, 0 to 100.
    Percent(u8),
}

impl Amount {
    /// How many hosts out of `total` this is. A percentage is rounded up; a
    /// non-zero percentage of a non-empty set is at least one host.
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => usize::try_from(n).unwrap_or(usize::MAX),
            Amount::Percent(p) => (total * usize::from(p)).div_ceil(100),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Parse an amount; `allow_zero` says whether `0` / `0%` is meaningful
/// (a failure budget) or not (a wave size).
pub fn parse_amount(raw: &Scalar, allow_zero: bool) -> Result<Amount, UnitError> {
    let what = if allow_zero {
        "a count of hosts (0 or more) or a percentage like `10%`"
    } else {
        "a positive count of hosts like `1` or a percentage like `25%`"
    };
    let amount =
        match raw {
            Scalar::Int(n) => {
                let n = u64::try_from(*n).map_err(|_| UnitError(format!("`{n}` is negative; write {what}")))?;
                Amount::Count(n)
            }
            Scalar::Text(t) => {
                let t = t.trim();
                if let Some(p) = t.strip_suffix('%') {
                    let p: u8 =
                        p.trim().parse().ok().filter(|p| *p <= 100).ok_or_else(|| {
                            UnitError(format!("`{t}` is not a percentage from 0% to 100%; write {what}"))
                        })?;
                    Amount::Percent(p)
                } else {
                    let n: u64 = t
                        .parse()
                        .map_err(|_| UnitError(format!("`{t}` is not an amount; write {what}")))?;
                    Amount::Count(n)
                }
            }
        };
    if !allow_zero && matches!(amount, Amount::Count(0) | Amount::Percent(0)) {
        return Err(UnitError(format!("`{raw}` would be an empty wave; write {what}")));
    }
    Ok(amount)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Scalar {
        Scalar::Text(s.into())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration(&text("30s")), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration(&text("10m")), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration(&text("72h")), Ok(Duration::from_secs(72 * 3600)));
        assert_eq!(parse_duration(&text("1h30m")), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(&text("250ms")), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(&Scalar::Int(0)), Ok(Duration::ZERO));
        for bad in ["", "10", "m", "10x", "1.5h", "-3s", "10 m"] {
            assert!(parse_duration(&text(bad)).is_err(), "{bad:?} accepted");
        }
        let err = parse_duration(&Scalar::Int(30)).expect_err("bare number");
        assert!(err.0.contains("30s"), "{err}");
    }

    #[test]
    fn durations_round_trip_through_format() {
        for s in ["30s", "10m", "1h30m", "250ms", "7d", "1d1h1m1s"] {
            let d = parse_duration(&text(s)).expect("parses");
            assert_eq!(format_duration(d), s);
        }
        assert_eq!(format_duration(Duration::from_secs(72 * 3600)), "3d");
    }

    #[test]
    fn amounts() {
        assert_eq!(parse_amount(&Scalar::Int(3), false), Ok(Amount::Count(3)));
        assert_eq!(parse_amount(&text("25%"), false), Ok(Amount::Percent(25)));
        assert_eq!(parse_amount(&text("0%"), true), Ok(Amount::Percent(0)));
        assert!(parse_amount(&Scalar::Int(0), false).is_err());
        assert!(parse_amount(&text("0%"), false).is_err());
        assert!(parse_amount(&text("101%"), false).is_err());
        assert!(parse_amount(&Scalar::Int(-1), true).is_err());
        assert!(parse_amount(&text("ten"), true).is_err());
    }

    #[test]
    fn percent_rounds_up() {
        assert_eq!(Amount::Percent(25).of(12), 3);
        assert_eq!(Amount::Percent(10).of(12), 2);
        assert_eq!(Amount::Percent(1).of(1), 1);
        assert_eq!(Amount::Percent(100).of(7), 7);
        assert_eq!(Amount::Percent(0).of(7), 0);
        assert_eq!(Amount::Count(5).of(2), 5);
    }
}
