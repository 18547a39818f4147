//! Layouts of a mixed video: which rectangles exist (templates) and which input fills
//! which rectangle (assignment). Pure code, no GStreamer, so every rule is unit-tested.
//!
//! Templates follow OWT: `fluid` is a d×d grid for the smallest d whose square holds the
//! inputs (1, 4, 9, 16, ...); `lecture` is one large region (2/3 of the width and height)
//! with small ones along the right column and the bottom row; custom region sets replace
//! the base template with the same region count. The template used is the one with the
//! fewest regions that still holds every input.

use tessera_core::StreamId;
use tessera_core::room::{Area, CustomTemplate, Fraction, Layout, Region};
use tessera_core::stream::LayoutEntry;

/// A rectangle in fractions of the output.
#[derive(Debug, Clone, PartialEq)]
pub struct Rect {
    /// Region id, unique in its template.
    pub id: String,
    /// Left edge.
    pub left: Fraction,
    /// Top edge.
    pub top: Fraction,
    /// Width.
    pub width: Fraction,
    /// Height.
    pub height: Fraction,
}

impl Rect {
    fn new(id: usize, left: (u32, u32), top: (u32, u32), width: (u32, u32), height: (u32, u32)) -> Rect {
        let f = |(num, den)| Fraction { num, den };
        Rect { id: id.to_string(), left: f(left), top: f(top), width: f(width), height: f(height) }
    }

    /// Pixel rectangle (x, y, w, h) in an output of `w` × `h`, sizes rounded to even numbers.
    pub fn pixels(&self, w: u32, h: u32) -> (i32, i32, i32, i32) {
        let px = |f: Fraction, total: u32| (f.value() * f64::from(total)).round() as i32;
        let even = |v: i32| (v / 2) * 2;
        (px(self.left, w), px(self.top, h), even(px(self.width, w)).max(2), even(px(self.height, h)).max(2))
    }
}

/// The region sets a view can use, smallest first.
#[derive(Debug, Clone)]
pub struct Templates {
    sets: Vec<Vec<Rect>>,
}

fn fluid(d: u32) -> Vec<Rect> {
    let mut v = Vec::new();
    for row in 0..d {
        for col in 0..d {
            v.push(Rect::new(v.len() + 1, (col, d), (row, d), (1, d), (1, d)));
        }
    }
    v
}

/// One big region (d-1)/d of the size at the top-left, then small 1/d tiles down the right
/// column and right-to-left along the bottom row: 2d-1 small ones.
fn lecture(d: u32) -> Vec<Rect> {
    let mut v = vec![Rect::new(1, (0, 1), (0, 1), (d - 1, d), (d - 1, d))];
    for row in 0..d {
        v.push(Rect::new(v.len() + 1, (d - 1, d), (row, d), (1, d), (1, d)));
    }
    for col in (0..d - 1).rev() {
        v.push(Rect::new(v.len() + 1, (col, d), (d - 1, d), (1, d), (1, d)));
    }
    v
}

fn custom(t: &CustomTemplate) -> Vec<Rect> {
    // Primary region first: it is the one the first (or active) input fills.
    let mut regions: Vec<Rect> =
        t.region.iter().map(|r| Rect { id: r.id.clone(), left: r.area.left, top: r.area.top, width: r.area.width, height: r.area.height }).collect();
    if let Some(p) = &t.primary
        && let Some(i) = regions.iter().position(|r| &r.id == p)
    {
        let primary = regions.remove(i);
        regions.insert(0, primary);
    }
    regions
}

impl Templates {
    /// The templates of a view layout, for up to `max_input` inputs.
    pub fn from_layout(layout: &Layout, max_input: u32) -> Templates {
        let max_input = max_input.max(1);
        let mut sets: Vec<Vec<Rect>> = match layout.templates.base.as_str() {
            "lecture" => {
                let mut s = vec![vec![Rect::new(1, (0, 1), (0, 1), (1, 1), (1, 1))]];
                let mut d = 3;
                loop {
                    s.push(lecture(d));
                    if 2 * d - 1 + 1 >= max_input || d >= 8 {
                        break;
                    }
                    d += 1;
                }
                s
            }
            "void" => Vec::new(),
            _ => {
                let top = (f64::from(max_input).sqrt().ceil() as u32).max(1);
                (1..=top).map(fluid).collect()
            }
        };
        for t in &layout.templates.custom {
            let regions = custom(t);
            match sets.iter().position(|s| s.len() == regions.len()) {
                Some(i) => sets[i] = regions,
                None => sets.push(regions),
            }
        }
        sets.sort_by_key(Vec::len);
        if sets.is_empty() {
            sets.push(fluid(1));
        }
        Templates { sets }
    }

    /// The region set for `n` inputs: the smallest that holds them all (or the largest).
    pub fn for_inputs(&self, n: usize) -> &[Rect] {
        self.sets.iter().find(|s| s.len() >= n).or_else(|| self.sets.last()).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Most inputs any template can show.
    pub fn capacity(&self) -> usize {
        self.sets.last().map(Vec::len).unwrap_or(0)
    }
}

/// Which stream fills which region: pinned streams first, then streams keep the region
/// they had (`previous`, so tiles do not jump when someone leaves), then the rest in join
/// order into the first free regions.
pub fn assign(regions: &[Rect], inputs: &[String], pins: &[(String, String)], previous: &[(String, String)]) -> Vec<(Rect, Option<String>)> {
    let mut out: Vec<(Rect, Option<String>)> = regions.iter().map(|r| (r.clone(), None)).collect();
    let mut placed: Vec<&String> = Vec::new();
    for (stream, region) in pins.iter().chain(previous) {
        if !inputs.contains(stream) || placed.contains(&stream) {
            continue;
        }
        if let Some(slot) = out.iter_mut().find(|(r, s)| &r.id == region && s.is_none()) {
            slot.1 = Some(stream.clone());
            placed.push(stream);
        }
    }
    let mut rest = inputs.iter().filter(|s| !placed.contains(s));
    for slot in out.iter_mut().filter(|(_, s)| s.is_none()) {
        match rest.next() {
            Some(s) => slot.1 = Some(s.clone()),
            None => break,
        }
    }
    out
}

/// The layout as the room sees it: each region with the stream placed in it, filled
/// regions first (as OWT lists them).
pub fn entries(assigned: &[(Rect, Option<String>)]) -> Vec<LayoutEntry> {
    let entry = |(r, s): &(Rect, Option<String>)| LayoutEntry {
        stream: s.as_deref().map(StreamId::from),
        region: Region { id: r.id.clone(), shape: "rectangle".into(), area: Area { left: r.left, top: r.top, width: r.width, height: r.height } },
    };
    let filled = assigned.iter().filter(|(_, s)| s.is_some()).map(entry);
    let empty = assigned.iter().filter(|(_, s)| s.is_none()).map(entry);
    filled.chain(empty).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn layout(base: &str) -> Layout {
        let mut l = Layout::default();
        l.templates.base = base.into();
        l
    }

    #[test]
    fn fluid_grows_1_4_9_16() {
        let t = Templates::from_layout(&layout("fluid"), 16);
        let sizes: Vec<usize> = [1, 2, 4, 5, 9, 10, 16].iter().map(|&n| t.for_inputs(n).len()).collect();
        assert_eq!(sizes, [1, 4, 4, 9, 9, 16, 16]);
        let four = t.for_inputs(2);
        assert_eq!(four[1].pixels(640, 480), (320, 0, 320, 240));
        assert_eq!(four[2].pixels(640, 480), (0, 240, 320, 240));
        assert_eq!(t.for_inputs(40).len(), 16, "beyond capacity the largest is used");
    }

    #[test]
    fn lecture_has_a_large_primary() {
        let t = Templates::from_layout(&layout("lecture"), 16);
        assert_eq!(t.for_inputs(1).len(), 1);
        let six = t.for_inputs(2);
        assert_eq!(six.len(), 6);
        assert_eq!(six[0].pixels(600, 600), (0, 0, 400, 400));
        assert_eq!(six[1].pixels(600, 600), (400, 0, 200, 200));
        assert_eq!(six[5].pixels(600, 600), (0, 400, 200, 200));
        assert!(t.capacity() >= 16);
    }

    #[test]
    fn custom_template_replaces_same_size_and_puts_primary_first() {
        let mut l = layout("fluid");
        let room = tessera_core::Room::from_options(
            "r".into(),
            "n".into(),
            json!({"views": [{"video": {"layout": {"templates": {"custom": [{"primary": "b", "region": [
                {"id": "a", "area": {"left": "0", "top": "0", "width": "1/2", "height": "1"}},
                {"id": "b", "area": {"left": "1/2", "top": "0", "width": "1/2", "height": "1"}},
                {"id": "c", "area": {"left": "0", "top": "0", "width": "1/4", "height": "1/4"}},
                {"id": "d", "area": {"left": "3/4", "top": "3/4", "width": "1/4", "height": "1/4"}}
            ]}]}}}}]}),
        )
        .unwrap();
        l.templates.custom = room.views[0].video.as_ref().unwrap().layout.templates.custom.clone();
        let t = Templates::from_layout(&l, 16);
        let four = t.for_inputs(3);
        assert_eq!(four.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["b", "a", "c", "d"]);
    }

    #[test]
    fn assignment_join_order_and_pins() {
        let t = Templates::from_layout(&layout("fluid"), 16);
        let regions = t.for_inputs(3);
        let inputs = vec!["s1".to_string(), "s2".into(), "s3".into()];
        let a = assign(regions, &inputs, &[], &[]);
        assert_eq!(a.iter().map(|(_, s)| s.as_deref()).collect::<Vec<_>>(), [Some("s1"), Some("s2"), Some("s3"), None]);
        // s1 leaves: the others keep their regions; s4 takes the first free one.
        let previous: Vec<(String, String)> = a.iter().filter_map(|(r, s)| s.clone().map(|s| (s, r.id.clone()))).collect();
        let later = vec!["s2".to_string(), "s3".into(), "s4".into()];
        let b = assign(regions, &later, &[], &previous);
        assert_eq!(b.iter().map(|(_, s)| s.as_deref()).collect::<Vec<_>>(), [Some("s4"), Some("s2"), Some("s3"), None]);
        let a = assign(regions, &inputs, &[("s3".into(), "1".into()), ("gone".into(), "2".into())], &[]);
        assert_eq!(a.iter().map(|(_, s)| s.as_deref()).collect::<Vec<_>>(), [Some("s3"), Some("s1"), Some("s2"), None]);
        let j = entries(&a);
        assert_eq!(j[0].stream.as_ref().map(StreamId::as_str), Some("s3"));
        assert_eq!(j[0].region.area.width, Fraction { num: 1, den: 2 });
        assert!(j[3].stream.is_none());
    }
}
