//! A strict parser for the Prometheus text exposition format, version
//! 0.0.4, so that a test can tell whether a scrape of `/metrics` would
//! fail.
//!
//! It enforces the rules of the format's documentation
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>): lines
//! end with a line feed, including the last one; metric and label names
//! have their documented syntax; label values and HELP texts use only
//! their documented escapes; at most one HELP and one TYPE line per metric,
//! before its samples; all lines of one metric form one group; no two
//! samples share a name and label set; values are floats, `NaN`, `+Inf` or
//! `-Inf`; timestamps are whole milliseconds.

use std::collections::HashSet;
use std::fmt;

/// The type a `# TYPE` line declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl MetricType {
    fn parse(token: &str) -> Option<MetricType> {
        match token {
            "counter" => Some(MetricType::Counter),
            "gauge" => Some(MetricType::Gauge),
            "histogram" => Some(MetricType::Histogram),
            "summary" => Some(MetricType::Summary),
            "untyped" => Some(MetricType::Untyped),
            _ => None,
        }
    }

    /// Suffixes a sample name may add to its family's name.
    fn sample_suffixes(self) -> &'static [&'static str] {
        match self {
            MetricType::Histogram => &["_bucket", "_sum", "_count"],
            MetricType::Summary => &["", "_sum", "_count"],
            MetricType::Counter | MetricType::Gauge | MetricType::Untyped => &[""],
        }
    }
}

/// Label names and values of one sample, in the order they were written.
pub type Labels = Vec<(String, String)>;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Labels in the order they were written, values unescaped.
    pub labels: Labels,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

impl Sample {
    /// Checks whether the sample has exactly these labels, in any order.
    pub fn has_labels(&self, labels: &[(&str, &str)]) -> bool {
        self.labels.len() == labels.len()
            && labels.iter().all(|(name, value)| {
                self.labels
                    .iter()
                    .any(|(own_name, own_value)| own_name == name && own_value == value)
            })
    }
}

/// The HELP and TYPE lines of one metric and its samples.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricFamily {
    pub name: String,
    /// The docstring, unescaped.
    pub help: Option<String>,
    pub kind: Option<MetricType>,
    pub samples: Vec<Sample>,
}

impl MetricFamily {
    fn new(name: &str) -> MetricFamily {
        MetricFamily {
            name: name.to_owned(),
            help: None,
            kind: None,
            samples: Vec::new(),
        }
    }

    fn owns_sample(&self, sample_name: &str) -> bool {
        let kind = self.kind.unwrap_or(MetricType::Untyped);
        kind.sample_suffixes().iter().any(|suffix| {
            sample_name
                .strip_prefix(self.name.as_str())
                .is_some_and(|rest| rest == *suffix)
        })
    }
}

/// A whole scrape, its metrics in the order they appeared.
#[derive(Clone, Debug, PartialEq)]
pub struct Exposition {
    pub families: Vec<MetricFamily>,
}

/// Why a scrape is invalid, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// Line number, from 1.
    pub line: usize,
    pub content: String,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {:?}", self.line, self.reason, self.content)
    }
}

impl std::error::Error for ParseError {}

impl Exposition {
    /// Parses a scrape, rejecting anything the format does not allow.
    pub fn parse(text: &str) -> Result<Exposition, ParseError> {
        let mut parser = Parser::default();
        if !text.is_empty() && !text.ends_with('\n') {
            let last = text.lines().last().unwrap_or_default();
            return Err(ParseError {
                line: text.lines().count(),
                content: last.to_owned(),
                reason: "the last line does not end with a line feed".to_owned(),
            });
        }
        for (index, line) in text.lines().enumerate() {
            parser.line(line).map_err(|reason| ParseError {
                line: index + 1,
                content: line.to_owned(),
                reason,
            })?;
        }
        Ok(Exposition {
            families: parser.families,
        })
    }

    pub fn family(&self, name: &str) -> Option<&MetricFamily> {
        self.families.iter().find(|family| family.name == name)
    }

    /// Returns the value of the sample named `name` with exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.families
            .iter()
            .flat_map(|family| &family.samples)
            .find(|sample| sample.name == name && sample.has_labels(labels))
            .map(|sample| sample.value)
    }
}

#[derive(Default)]
struct Parser {
    families: Vec<MetricFamily>,
    /// Sample names with their sorted labels, to find duplicates.
    series: HashSet<(String, Labels)>,
}

impl Parser {
    fn line(&mut self, line: &str) -> Result<(), String> {
        let line = line.trim_matches(is_blank);
        if line.is_empty() {
            return Ok(());
        }
        match line.strip_prefix('#') {
            Some(comment) => self.comment(comment.trim_start_matches(is_blank)),
            None => self.sample(line),
        }
    }

    /// Handles HELP and TYPE lines; other comments are ignored.
    fn comment(&mut self, comment: &str) -> Result<(), String> {
        let (keyword, rest) = split_token(comment);
        match keyword {
            "HELP" => {
                let (name, docstring) = split_token(rest);
                check_metric_name(name)?;
                let help = unescape(docstring, &['\\', 'n'])
                    .map_err(|reason| format!("HELP text of {name}: {reason}"))?;
                let family = self.family_for_metadata(name)?;
                if family.help.is_some() {
                    return Err(format!("second HELP line for {name}"));
                }
                family.help = Some(help);
                Ok(())
            }
            "TYPE" => {
                let (name, rest) = split_token(rest);
                check_metric_name(name)?;
                let (kind_token, rest) = split_token(rest);
                if !rest.is_empty() {
                    return Err(format!("TYPE line for {name} has extra tokens"));
                }
                let kind = MetricType::parse(kind_token)
                    .ok_or_else(|| format!("unknown metric type {kind_token:?}"))?;
                let family = self.family_for_metadata(name)?;
                if family.kind.is_some() {
                    return Err(format!("second TYPE line for {name}"));
                }
                family.kind = Some(kind);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Returns the family a HELP or TYPE line for `name` belongs to: the
    /// current one if it has that name and no sample yet, or a new one.
    fn family_for_metadata(&mut self, name: &str) -> Result<&mut MetricFamily, String> {
        let continues_current = self
            .families
            .last()
            .is_some_and(|family| family.name == name);
        if continues_current {
            let family = self.families.last_mut().expect("checked above");
            if !family.samples.is_empty() {
                return Err(format!(
                    "HELP or TYPE line for {name} after its first sample"
                ));
            }
            return Ok(family);
        }
        self.start_family(name)
    }

    fn start_family(&mut self, name: &str) -> Result<&mut MetricFamily, String> {
        if self.families.iter().any(|family| family.name == name) {
            return Err(format!(
                "lines for {name} do not form one group: it appeared earlier"
            ));
        }
        self.families.push(MetricFamily::new(name));
        Ok(self.families.last_mut().expect("just pushed"))
    }

    fn sample(&mut self, line: &str) -> Result<(), String> {
        let sample = parse_sample(line)?;

        let mut key_labels = sample.labels.clone();
        key_labels.sort();
        if !self.series.insert((sample.name.clone(), key_labels)) {
            return Err(format!(
                "a second sample of {} with the same labels",
                sample.name
            ));
        }

        let belongs_to_current = self
            .families
            .last()
            .is_some_and(|family| family.owns_sample(&sample.name));
        let family = if belongs_to_current {
            self.families.last_mut().expect("checked above")
        } else {
            let owner = self
                .families
                .iter()
                .find(|family| family.owns_sample(&sample.name));
            if let Some(owner) = owner {
                return Err(format!(
                    "lines for {} do not form one group: it appeared earlier",
                    owner.name
                ));
            }
            self.start_family(&sample.name)?
        };
        family.samples.push(sample);
        Ok(())
    }
}

fn is_blank(character: char) -> bool {
    character == ' ' || character == '\t'
}

/// Splits off the first blank-separated token.
fn split_token(text: &str) -> (&str, &str) {
    let text = text.trim_start_matches(is_blank);
    match text.find(is_blank) {
        Some(end) => (&text[..end], text[end..].trim_start_matches(is_blank)),
        None => (text, ""),
    }
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut characters = name.chars();
    let valid = characters
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && characters.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if valid {
        Ok(())
    } else {
        Err(format!("invalid metric name {name:?}"))
    }
}

fn check_label_name(name: &str) -> Result<(), String> {
    let mut characters = name.chars();
    let valid = characters
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && characters.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("invalid label name {name:?}"));
    }
    if name.starts_with("__") {
        return Err(format!("label name {name:?} uses the reserved prefix __"));
    }
    Ok(())
}

/// Resolves backslash escapes; `allowed` lists the characters that may
/// follow a backslash (`n` stands for a line feed).
fn unescape(text: &str, allowed: &[char]) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut characters = text.chars();
    while let Some(character) = characters.next() {
        if character != '\\' {
            out.push(character);
            continue;
        }
        match characters.next() {
            Some(escaped) if allowed.contains(&escaped) => {
                out.push(if escaped == 'n' { '\n' } else { escaped });
            }
            Some(escaped) => return Err(format!("invalid escape sequence \\{escaped}")),
            None => return Err("a backslash ends the text".to_owned()),
        }
    }
    Ok(out)
}

/// Parses `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];

    let mut labels = Vec::new();
    if let Some(after_brace) = rest.trim_start_matches(is_blank).strip_prefix('{') {
        let (parsed, after_labels) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after_labels;
    }

    if !rest.starts_with(is_blank) {
        return Err(format!("no blank between {name} and its value"));
    }
    let (value_token, rest) = split_token(rest);
    let value = parse_value(value_token)?;
    let (timestamp_token, rest) = split_token(rest);
    if !rest.is_empty() {
        return Err("extra tokens after the timestamp".to_owned());
    }
    let timestamp_ms = if timestamp_token.is_empty() {
        None
    } else {
        Some(parse_timestamp(timestamp_token)?)
    };

    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
        timestamp_ms,
    })
}

/// Parses the labels after `{` and returns them with the text after `}`.
fn parse_labels(mut text: &str) -> Result<(Labels, &str), String> {
    let mut labels = Labels::new();
    loop {
        text = text.trim_start_matches(is_blank);
        if let Some(rest) = text.strip_prefix('}') {
            return Ok((labels, rest));
        }

        let name_end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("the label set is not closed")?;
        let name = &text[..name_end];
        check_label_name(name)?;
        if labels.iter().any(|(existing, _)| existing == name) {
            return Err(format!("label {name} appears twice"));
        }
        text = text[name_end..].trim_start_matches(is_blank);
        text = text
            .strip_prefix('=')
            .ok_or_else(|| format!("no = after label {name}"))?
            .trim_start_matches(is_blank);
        text = text
            .strip_prefix('"')
            .ok_or_else(|| format!("the value of label {name} is not quoted"))?;

        let closing = find_closing_quote(text)
            .ok_or_else(|| format!("the value of label {name} is not closed"))?;
        let value = unescape(&text[..closing], &['\\', '"', 'n'])
            .map_err(|reason| format!("value of label {name}: {reason}"))?;
        labels.push((name.to_owned(), value));
        text = text[closing + 1..].trim_start_matches(is_blank);

        if let Some(rest) = text.strip_prefix(',') {
            text = rest;
        } else if !text.starts_with('}') {
            return Err(format!("expected , or }} after label {name}"));
        }
    }
}

/// Finds the byte offset of the first double quote not escaped by a
/// backslash.
fn find_closing_quote(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (offset, character) in text.char_indices() {
        match character {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return Some(offset),
            _ => escaped = false,
        }
    }
    None
}

/// Parses a sample value as Go's `strconv.ParseFloat` reads decimal
/// notation, plus `NaN`, `+Inf` and `-Inf` in any letter case.
// NOTE: hexadecimal floats, which ParseFloat also accepts, are rejected
// here.
fn parse_value(token: &str) -> Result<f64, String> {
    let special = match token.to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "inf" | "+inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => None,
    };
    if let Some(value) = special {
        return Ok(value);
    }
    let decimal_characters = token
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | '.' | 'e' | 'E'));
    match token.parse::<f64>() {
        Ok(value) if decimal_characters && !token.is_empty() => Ok(value),
        _ => Err(format!("invalid sample value {token:?}")),
    }
}

fn parse_timestamp(token: &str) -> Result<i64, String> {
    let digits = token.strip_prefix('-').unwrap_or(token);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("invalid timestamp {token:?}"));
    }
    token
        .parse()
        .map_err(|_| format!("timestamp {token:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_scrape_parses() {
        let text = "# HELP up_total Starts, with a \\\\ and a\\nline feed.\n\
                    # TYPE up_total counter\n\
                    up_total 3\n\
                    \n\
                    # TYPE temperature gauge\n\
                    temperature{room=\"a \\\"quoted\\\" \\\\ name\",floor=\"1\",} -1.5e3 1714150000000\n\
                    temperature {room=\"b\"} NaN\n\
                    # a comment\n\
                    latency_seconds_sum 2\n";
        let exposition = Exposition::parse(text).unwrap();

        let names: Vec<&str> = exposition
            .families
            .iter()
            .map(|family| family.name.as_str())
            .collect();
        assert_eq!(names, ["up_total", "temperature", "latency_seconds_sum"]);
        assert_eq!(
            exposition.families[0].help.as_deref(),
            Some("Starts, with a \\ and a\nline feed.")
        );
        assert_eq!(exposition.value("up_total", &[]), Some(3.0));
        assert_eq!(
            exposition.value(
                "temperature",
                &[("floor", "1"), ("room", "a \"quoted\" \\ name")]
            ),
            Some(-1500.0)
        );
        assert!(exposition
            .value("temperature", &[("room", "b")])
            .unwrap()
            .is_nan());
        assert_eq!(
            exposition.families[1].samples[0].timestamp_ms,
            Some(1714150000000)
        );
    }

    #[test]
    fn invalid_scrapes_are_rejected() {
        let cases = [
            ("up 1", "last line"),
            ("1up 1\n", "metric name"),
            ("up{1a=\"x\"} 1\n", "label name"),
            ("up{__name=\"x\"} 1\n", "reserved"),
            ("up{a=\"x\",a=\"y\"} 1\n", "twice"),
            ("up{a=x} 1\n", "not quoted"),
            ("up{a=\"x\\t\"} 1\n", "escape"),
            ("up{a=\"x\"1\n", "expected"),
            ("up{a=\"x\"}1\n", "no blank"),
            ("up one\n", "sample value"),
            ("up 0x1p3\n", "sample value"),
            ("up 1 12.5\n", "timestamp"),
            ("up 1 2 3\n", "extra tokens"),
            ("# TYPE up gauge\n# TYPE up gauge\nup 1\n", "second TYPE"),
            ("# HELP up a\n# HELP up b\nup 1\n", "second HELP"),
            ("# TYPE up meter\nup 1\n", "unknown metric type"),
            ("# HELP up bad \\t escape\nup 1\n", "escape"),
            ("up 1\n# TYPE up gauge\n", "after its first sample"),
            ("up 1\ndown 1\nup{a=\"b\"} 1\n", "one group"),
            ("up 1\nup 2\n", "same labels"),
            (
                "up{a=\"1\",b=\"2\"} 1\nup{b=\"2\",a=\"1\"} 1\n",
                "same labels",
            ),
            ("# TYPE up counter\nup_sum 1\nup 1\n", "one group"),
        ];
        for (text, expected) in cases {
            let error = Exposition::parse(text).unwrap_err();
            assert!(
                error.to_string().contains(expected),
                "{text:?}: expected {expected:?}, got {error}"
            );
        }
    }

    #[test]
    fn histogram_suffixes_stay_in_their_family() {
        let text = "# TYPE request_seconds histogram\n\
                    request_seconds_bucket{le=\"1\"} 2\n\
                    request_seconds_bucket{le=\"+Inf\"} 3\n\
                    request_seconds_sum 1.5\n\
                    request_seconds_count 3\n";
        let exposition = Exposition::parse(text).unwrap();
        assert_eq!(exposition.families.len(), 1);
        assert_eq!(exposition.families[0].samples.len(), 4);
    }
}
