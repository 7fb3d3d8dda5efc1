"""Network pieces every listener uses: SNI, the PROXY protocol, connecting upstream and
relaying bytes."""
