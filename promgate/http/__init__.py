"""HTTP/1.1 as promgate speaks it: strict wire parsing, chunked framing, constant refusals
and the pooled upstream connections."""
