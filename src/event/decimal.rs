//! Amounts on the wire: decimal strings, exact or refused. At most 18
//! digits before the point, 18 after and 28 in all, so every accepted
//! amount is a `Decimal` exactly; the OpenAPI document states the same rule
//! as a pattern.

use rust_decimal::Decimal;

use super::Reason;

/// A decimal string: optional minus, digits, optional fraction. Too many
/// digits for exact arithmetic is `overflow`; anything else malformed is
/// `schema`.
pub fn parse_decimal(s: &str) -> Result<Decimal, (Reason, String)> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    let digits_ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !digits_ok(int) || frac.is_some_and(|f| !digits_ok(f)) {
        return Err((Reason::Schema, format!("`{s}` is not a decimal string")));
    }
    // At most 18 significant digits before the point and 18 after, and 28
    // in all: every such amount is a `Decimal` exactly (a 96-bit mantissa
    // holds any 28 digits), where `Decimal::from_str` would round a longer
    // one without a word.
    let int_digits = int.trim_start_matches('0').len();
    let frac_digits = frac.map_or(0, str::len);
    if int_digits > 18 || frac_digits > 18 || int_digits + frac_digits > 28 {
        return Err((
            Reason::Overflow,
            format!(
                "`{s}` has more digits than an amount may have (18 before the point, 18 after, 28 in all)"
            ),
        ));
    }
    Decimal::from_str_exact(s).map_err(|e| (Reason::Overflow, format!("`{s}`: {e}")))
}

/// The JSON Schema pattern of exactly the strings [`parse_decimal`]
/// accepts (the OpenAPI document uses it).
pub fn decimal_pattern() -> String {
    let alts: Vec<String> = (0..=18)
        .map(|j| {
            let int = if j == 0 {
                "0+".to_string()
            } else {
                format!("0*[1-9][0-9]{{{}}}", j - 1)
            };
            format!("{int}(\\.[0-9]{{1,{}}})?", (28 - j).min(18))
        })
        .collect();
    format!("^-?({})$", alts.join("|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact_or_overflow_and_the_pattern_says_which() {
        let re = |s: &str| {
            // The pattern's alternatives, checked by hand (no regex crate).
            let body = s.strip_prefix('-').unwrap_or(s);
            let (int, frac) = body
                .split_once('.')
                .map_or((body, None), |(i, f)| (i, Some(f)));
            let j = int.trim_start_matches('0').len();
            !int.is_empty()
                && int.bytes().all(|b| b.is_ascii_digit())
                && frac.is_none_or(|f| {
                    !f.is_empty()
                        && f.bytes().all(|b| b.is_ascii_digit())
                        && f.len() <= (28 - j.min(28)).min(18)
                })
                && j <= 18
        };
        for s in [
            "0",
            "-0",
            "007",
            "1.5",
            "0.000000000000000001",
            "123456789012345678",
            "1234567890.123456789012345678",
            "12345678901.12345678901234567",
            "123456789012345678.1234567890",
        ] {
            assert!(parse_decimal(s).is_ok(), "{s}");
            assert!(re(s), "{s}");
            // Every digit kept: the value is the input without its
            // leading and trailing zeros.
            let (sign, body) = s.strip_prefix('-').map_or(("", s), |b| ("-", b));
            let (int, frac) = body.split_once('.').unwrap_or((body, ""));
            let int = match int.trim_start_matches('0') {
                "" => "0",
                i => i,
            };
            let digits = match (int, frac.trim_end_matches('0')) {
                ("0", "") => "0".to_string(),
                (i, "") => format!("{sign}{i}"),
                (i, f) => format!("{sign}{i}.{f}"),
            };
            assert_eq!(parse_decimal(s).unwrap().normalize().to_string(), digits, "{s}");
        }
        for s in [
            "123456789012345678.12345678901",
            "1234567890123456789",
            "0.0000000000000000001",
            "12345678901.123456789012345678",
        ] {
            assert_eq!(parse_decimal(s).unwrap_err().0, Reason::Overflow, "{s}");
            assert!(!re(s), "{s}");
        }
        // Exact, never rounded.
        assert_eq!(
            parse_decimal("123456789012345678.1234567890")
                .unwrap()
                .to_string(),
            "123456789012345678.1234567890"
        );
        let p = decimal_pattern();
        assert!(
            p.starts_with("^-?(0+(\\.[0-9]{1,18})?|0*[1-9][0-9]{0}(\\.[0-9]{1,18})?|"),
            "{p}"
        );
        assert!(p.ends_with("|0*[1-9][0-9]{17}(\\.[0-9]{1,10})?)$"), "{p}");
    }
}
