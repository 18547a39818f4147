//! The MCU: GStreamer pipelines composing forward streams into mixed streams (see issue "mixer").
