//! The SFU: WebRTC sessions that forward published streams to subscribers (see issue "webrtc-agent").
