//! Reads the Prometheus text exposition format (version 0.0.4) the services' `/metrics` write:
//! `name{label="value",...} value [timestamp]` lines; `#` lines (HELP, TYPE) are skipped.
//!
//! Only what the status page needs: names, labels and values. A line that does not parse is
//! skipped, not an error (one odd series must not blank the page). Bounded: at most
//! [`MAX_SAMPLES`] samples and [`MAX_LABELS`] labels a sample are kept.

/// Most samples kept from one scrape.
pub const MAX_SAMPLES: usize = 50_000;
/// Most labels kept on one sample.
pub const MAX_LABELS: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The label's value, `""` when absent (as PromQL sees it).
    pub fn label(&self, name: &str) -> &str {
        self.labels.iter().find(|(key, _)| key == name).map_or("", |(_, value)| value.as_str())
    }
}

pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_line)
        .take(MAX_SAMPLES)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample { name: name.to_string(), labels, value })
}

/// `key="value",...}` → the labels and what follows the closing brace.
fn parse_labels(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = text.find('=')?;
        let key = text[..eq].trim().to_string();
        let quoted = text[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        if labels.len() < MAX_LABELS {
            labels.push((key, value));
        }
        text = &quoted[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_labels_and_values() {
        let text = r#"
# HELP llm_requests_total calls
# TYPE llm_requests_total counter
llm_requests_total{endpoint="Generate",status="OK"} 12
llm_active_requests 3
llm_response_time_bucket{endpoint="Generate",le="+Inf"} 4 1700000000000
weird{a="x \"quoted\" \\ back",b="line\nbreak",} 1.5e3
broken{a="x"
nolabels_novalue
"#;
        let samples = parse(text);
        assert_eq!(samples.len(), 4, "{samples:?}");
        assert_eq!(samples[0].name, "llm_requests_total");
        assert_eq!(samples[0].label("endpoint"), "Generate");
        assert_eq!(samples[0].label("status"), "OK");
        assert_eq!(samples[0].label("absent"), "");
        assert_eq!(samples[0].value, 12.0);
        assert_eq!(samples[1], Sample { name: "llm_active_requests".into(), labels: vec![], value: 3.0 });
        assert_eq!(samples[2].label("le"), "+Inf");
        assert_eq!(samples[3].label("a"), r#"x "quoted" \ back"#);
        assert_eq!(samples[3].label("b"), "line\nbreak");
        assert_eq!(samples[3].value, 1500.0);
    }
}
