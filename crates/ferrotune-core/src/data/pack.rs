//! Sequence packing (`packing`, `neat_packing`): samples concatenated into rows of at most `capacity` tokens
//! with LLaMA-Factory's greedy knapsack, so the same samples end up in the same rows in the same order.

use super::encode::Sample;

/// Packs `samples` into rows of at most `capacity` tokens. With `neat` each row records its samples' lengths
/// ([`Sample::segments`]) so the model keeps them independent, and the first label of every sample after the
/// first is masked (run alone, a sample's first token is never predicted; packed, the previous sample's last
/// position would predict it).
pub fn pack(samples: Vec<Sample>, capacity: usize, neat: bool) -> Vec<Sample> {
    if samples.is_empty() {
        return samples;
    }
    // LLaMA-Factory's `length2indexes[length].pop()`: the last sample of a length first.
    let mut by_length: std::collections::HashMap<usize, Vec<usize>> = Default::default();
    let mut lengths = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        let n = s.input_ids.len();
        lengths.push(n);
        by_length.entry(n).or_default().push(i);
    }
    let mut slots: Vec<Option<Sample>> = samples.into_iter().map(Some).collect();
    let mut out = Vec::new();
    for knapsack in greedy_knapsack(lengths, capacity) {
        let mut row: Option<Sample> = None;
        for len in knapsack {
            let i = by_length.get_mut(&len).and_then(Vec::pop).expect("every packed length comes from a sample");
            let s = slots[i].take().expect("each sample is packed once");
            row = Some(match row {
                None => {
                    let mut first = s;
                    if neat {
                        first.segments = vec![first.input_ids.len()];
                    }
                    first
                }
                Some(mut r) => {
                    let mut labels = s.labels;
                    if neat {
                        if let Some(l) = labels.first_mut() {
                            *l = super::encode::IGNORE_INDEX;
                        }
                        r.segments.push(s.input_ids.len());
                    }
                    r.input_ids.extend(s.input_ids);
                    r.labels.extend(labels);
                    r.images.extend(s.images);
                    r.image_sizes.extend(s.image_sizes);
                    r.image_tokens.extend(s.image_tokens);
                    r
                }
            });
        }
        out.extend(row);
    }
    out
}

/// LLaMA-Factory's `greedy_knapsack`: lengths sorted ascending; each knapsack repeatedly takes the largest
/// length that still fits (the last of equal ones) until none does. A length above `capacity` gets a
/// knapsack of its own (LLaMA-Factory drops such samples before packing; encoding has cut them to fit here).
pub fn greedy_knapsack(mut numbers: Vec<usize>, capacity: usize) -> Vec<Vec<usize>> {
    numbers.sort_unstable();
    let mut knapsacks = Vec::new();
    while !numbers.is_empty() {
        let mut current = Vec::new();
        let mut remaining = capacity;
        loop {
            // bisect_right(numbers, remaining) - 1
            let fit = numbers.partition_point(|&x| x <= remaining);
            if fit == 0 {
                break;
            }
            let n = numbers.remove(fit - 1);
            remaining -= n;
            current.push(n);
        }
        if current.is_empty() {
            current.push(numbers.remove(0));
        }
        knapsacks.push(current);
    }
    knapsacks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knapsack_fills_with_the_largest_that_fits() {
        // sorted: 2 3 5 7 9; capacity 10: [9], [7, 3], [5, 2]
        assert_eq!(greedy_knapsack(vec![5, 9, 2, 7, 3], 10), vec![vec![9], vec![7, 3], vec![5, 2]]);
        assert_eq!(greedy_knapsack(vec![4, 4, 4], 8), vec![vec![4, 4], vec![4]]);
        assert_eq!(greedy_knapsack(vec![12, 1], 10), vec![vec![1], vec![12]]);
    }
}
