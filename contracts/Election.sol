// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

/// @title Election
/// @notice The two pure rules of master election, shared by the stake registry and the job escrow
/// and mirrored to the bit by `consensus/election.py`: the stake-weighted committee draw of an
/// epoch, and the per-job ranking of that committee.
library Election {
    /// @notice The candidate table and the weight table differ in length.
    error LengthMismatch(uint256 candidates, uint256 weights);
    /// @notice A candidate has weight zero: it could never be drawn, so the table is malformed.
    error ZeroWeight(uint256 index);
    /// @notice A committee of size zero was asked for.
    error ZeroCommitteeSize();

    /// @notice Stake-weighted sampling without replacement (see docs/economics.md, Election).
    /// @dev Draws `min(k, n)` members. Works in place: `table` and `weights` are reordered, so
    /// callers pass arrays they no longer need.
    function drawCommittee(
        address[] memory table,
        uint256[] memory weights,
        bytes32 seed,
        uint256 k
    ) internal pure returns (address[] memory committee) {
        uint256 n = table.length;
        if (weights.length != n) revert LengthMismatch(n, weights.length);
        if (k == 0) revert ZeroCommitteeSize();
        uint256 total;
        for (uint256 i; i < n; ++i) {
            if (weights[i] == 0) revert ZeroWeight(i);
            total += weights[i];
        }
        uint256 size = k < n ? k : n;
        committee = new address[](size);
        for (uint256 i; i < size; ++i) {
            uint256 r = uint256(keccak256(abi.encode(seed, i))) % total;
            uint256 last = n - 1 - i;
            uint256 acc;
            uint256 j;
            for (; j < last; ++j) {
                acc += weights[j];
                if (r < acc) break;
            }
            // r < total, so when no earlier entry matched the last one does.
            committee[i] = table[j];
            total -= weights[j];
            table[j] = table[last];
            weights[j] = weights[last];
        }
    }

    /// @notice The key a job ranks committee members by: lower keys come first.
    function rankKey(bytes32 jobId, address member) internal pure returns (uint256) {
        return uint256(keccak256(abi.encode(jobId, member)));
    }

    /// @notice The committee ordered by `rankKey(jobId, member)` ascending; rank 0 is first master.
    function rankMasters(bytes32 jobId, address[] memory committee)
        internal
        pure
        returns (address[] memory ranked)
    {
        uint256 n = committee.length;
        ranked = new address[](n);
        uint256[] memory keys = new uint256[](n);
        for (uint256 i; i < n; ++i) {
            uint256 key = rankKey(jobId, committee[i]);
            uint256 j = i;
            while (j > 0 && keys[j - 1] > key) {
                keys[j] = keys[j - 1];
                ranked[j] = ranked[j - 1];
                --j;
            }
            keys[j] = key;
            ranked[j] = committee[i];
        }
    }

    /// @notice `member`'s rank for `jobId` without sorting the committee: one hash per member.
    /// @return found Whether `member` sits on the committee at all.
    /// @return rank How many members rank before `member`.
    function rankOf(bytes32 jobId, address[] memory committee, address member)
        internal
        pure
        returns (bool found, uint256 rank)
    {
        uint256 key = rankKey(jobId, member);
        for (uint256 i; i < committee.length; ++i) {
            if (committee[i] == member) {
                found = true;
            } else if (rankKey(jobId, committee[i]) < key) {
                ++rank;
            }
        }
    }
}
