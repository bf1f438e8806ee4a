//! Raw samples as CSV: one row per sample, `probe,index,cycles`.

//! Cycles are signed: a negative value is a sample whose TSC ran backwards.

use crate::results::ProbeSamples;
use std::io::Write;

pub fn write(out: &mut dyn Write, samples: &ProbeSamples) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(out);
    writeln!(out, "probe,index,cycles")?;
    for (probe, values) in samples {
        for (index, cycles) in values.iter().enumerate() {
            writeln!(out, "{},{index},{cycles}", probe.name())?;
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_payload::Probe;
    use std::collections::BTreeMap;

    #[test]
    fn one_row_per_sample_after_a_header() {
        let samples = BTreeMap::from([(Probe::Cpuid, vec![10, -20]), (Probe::Nop, vec![3])]);
        let mut out = Vec::new();
        write(&mut out, &samples).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "probe,index,cycles\ncpuid,0,10\ncpuid,1,-20\nnop,0,3\n"
        );
    }
}
