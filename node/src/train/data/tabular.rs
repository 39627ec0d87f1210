//! Tabular files for classification: CSV and NumPy `.npy`, parsed from bytes held in
//! memory (at most [`MAX_FILE_BYTES`](super::MAX_FILE_BYTES)).

use super::{format_err, DataError};
use std::path::Path;

/// CSV: numeric features then an integer label per line; a first line that does not parse
/// is a header; blank lines are skipped.
pub(super) fn parse_csv(
    path: &Path,
    bytes: &[u8],
) -> Result<(Vec<f32>, Vec<i64>, usize), DataError> {
    let text =
        std::str::from_utf8(bytes).map_err(|e| format_err(path, format!("not UTF-8: {e}")))?;
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut width: Option<usize> = None;
    for (ln, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let parsed: Result<Vec<f64>, _> = fields.iter().map(|f| f.parse::<f64>()).collect();
        let Ok(vals) = parsed else {
            if ln == 0 {
                continue; // header
            }
            return Err(format_err(
                path,
                format!("line {}: a field is not a number", ln + 1),
            ));
        };
        if vals.len() < 2 {
            return Err(format_err(
                path,
                format!("line {}: needs at least one feature and a label", ln + 1),
            ));
        }
        match width {
            None => width = Some(vals.len()),
            Some(w) if w != vals.len() => {
                return Err(format_err(
                    path,
                    format!(
                        "line {}: {} fields, earlier lines have {w}",
                        ln + 1,
                        vals.len()
                    ),
                ))
            }
            _ => {}
        }
        let label = vals[vals.len() - 1];
        if label < 0.0 || label.fract() != 0.0 || label > 1e6 {
            return Err(format_err(
                path,
                format!("line {}: label {label} is not a class index", ln + 1),
            ));
        }
        if vals.iter().any(|v| !v.is_finite()) {
            return Err(format_err(
                path,
                format!("line {}: a value is not finite", ln + 1),
            ));
        }
        x.extend(vals[..vals.len() - 1].iter().map(|&v| v as f32));
        y.push(label as i64);
    }
    let Some(w) = width else {
        return Err(format_err(path, "no data rows"));
    };
    Ok((x, y, w - 1))
}

/// Parses an `.npy` file (format 1.0–3.0, C order, little-endian or byte-sized numbers)
/// into its shape and values as f64.
pub fn parse_npy(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<f64>), DataError> {
    let bad = |p: &str| format_err(path, format!("not a supported .npy file: {p}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing magic"));
    }
    let (hlen, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unknown version")),
    };
    let header = bytes
        .get(start..start.saturating_add(hlen))
        .ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))?;
        let rest = header[i + key.len() + 2..].trim_start().strip_prefix(':')?;
        Some(rest.trim_start())
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad("no descr"))?;
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err(bad("Fortran order"));
    }
    let shape_text = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let mut shape = Vec::new();
    for d in shape_text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        shape.push(d.parse::<usize>().map_err(|_| bad("bad shape"))?);
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    let (size, read): (usize, fn(&[u8]) -> f64) = match descr {
        "<f4" => (4, |b| f32::from_le_bytes(b.try_into().unwrap()) as f64),
        "<f8" => (8, |b| f64::from_le_bytes(b.try_into().unwrap())),
        "<i8" => (8, |b| i64::from_le_bytes(b.try_into().unwrap()) as f64),
        "<i4" => (4, |b| i32::from_le_bytes(b.try_into().unwrap()) as f64),
        "<i2" => (2, |b| i16::from_le_bytes(b.try_into().unwrap()) as f64),
        "|u1" => (1, |b| b[0] as f64),
        "|i1" => (1, |b| b[0] as i8 as f64),
        other => return Err(bad(&format!("dtype {other}"))),
    };
    let data = &bytes[start + hlen..];
    if Some(data.len()) != numel.checked_mul(size) {
        return Err(bad(&format!(
            "{} data bytes for shape {shape:?} of {descr}",
            data.len()
        )));
    }
    let vals: Vec<f64> = data.chunks_exact(size).map(read).collect();
    if vals.iter().any(|v| !v.is_finite()) {
        return Err(bad("a value is not finite"));
    }
    Ok((shape, vals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_header_and_errors() {
        let p = Path::new("t.csv");
        let (x, y, f) = parse_csv(p, b"a,b,label\n1,2,0\n3,4,1\n\n").unwrap();
        assert_eq!((x, y, f), (vec![1., 2., 3., 4.], vec![0, 1], 2));
        assert!(parse_csv(p, b"1,2,0\n3,x,1\n")
            .unwrap_err()
            .to_string()
            .contains("line 2"));
        assert!(parse_csv(p, b"1,2,0\n3,1\n")
            .unwrap_err()
            .to_string()
            .contains("line 2"));
        assert!(parse_csv(p, b"1,2,0.5\n")
            .unwrap_err()
            .to_string()
            .contains("label"));
        assert!(parse_csv(p, b"").is_err());
    }

    #[test]
    fn npy_parses_and_refuses_garbage() {
        let mut f = b"\x93NUMPY\x01\x00".to_vec();
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        let h = format!("{h:<width$}\n", width = 64 - 10 - 1);
        f.extend((h.len() as u16).to_le_bytes());
        f.extend(h.as_bytes());
        for v in 0..6 {
            f.extend((v as f32).to_le_bytes());
        }
        let (s, v) = parse_npy(Path::new("x.npy"), &f).unwrap();
        assert_eq!(s, vec![2, 3]);
        assert_eq!(v, vec![0., 1., 2., 3., 4., 5.]);
        assert!(parse_npy(Path::new("x.npy"), &f[..f.len() - 1]).is_err());
        assert!(parse_npy(Path::new("x.npy"), b"\x93NUMPY\x01\x00\xff\xff").is_err());
        assert!(parse_npy(Path::new("x.npy"), b"garbage").is_err());
    }
}
