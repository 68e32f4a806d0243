// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title AggregatorV3Interface
/// @notice The read side of Chainlink-style price feeds. The Python side reads any contract with
/// this interface, so a deployment may name a third-party feed instead of `PriceFeed`.
interface AggregatorV3Interface {
    function decimals() external view returns (uint8);

    function description() external view returns (string memory);

    function version() external view returns (uint256);

    function getRoundData(uint80 roundId)
        external
        view
        returns (
            uint80 roundId_,
            int256 answer,
            uint256 startedAt,
            uint256 updatedAt,
            uint80 answeredInRound
        );

    function latestRoundData()
        external
        view
        returns (
            uint80 roundId,
            int256 answer,
            uint256 startedAt,
            uint256 updatedAt,
            uint80 answeredInRound
        );
}

/// @title PriceFeed
/// @notice An owner-set price (for ravenp2p: USD per RAVEN) behind the Chainlink
/// `AggregatorV3Interface`. Every `setPrice` opens and answers a new round at once.
/// @dev For devnets and deployments without a market feed; the owner is trusted with the price.
/// Rounds are numbered from 1, and each answers itself (`answeredInRound == roundId`).
contract PriceFeed is AggregatorV3Interface, Ownable {
    struct Round {
        int256 answer;
        uint64 updatedAt;
    }

    /// @notice The version of this feed's behaviour (Chainlink feeds report their own).
    uint256 public constant override version = 1;
    /// @notice Decimals of `answer`: a price `p` is reported as `p * 10**decimals`.
    uint8 public immutable override decimals;
    /// @notice The id of the newest round.
    uint80 public latestRound;

    string private _description;
    mapping(uint80 roundId => Round) private _rounds;

    /// @dev The events Chainlink aggregators emit, so their tooling can follow this feed.
    event NewRound(uint256 indexed roundId, address indexed startedBy, uint256 startedAt);
    event AnswerUpdated(int256 indexed current, uint256 indexed roundId, uint256 updatedAt);

    error NonPositiveAnswer(int256 answer);
    error RoundNotFound(uint80 roundId);

    /// @param description_ What the answer prices, e.g. "RAVEN / USD".
    /// @param decimals_ Decimals of every answer.
    /// @param initialAnswer The answer of round 1 (positive), so the feed is never empty.
    constructor(string memory description_, uint8 decimals_, int256 initialAnswer)
        Ownable(msg.sender)
    {
        _description = description_;
        decimals = decimals_;
        _record(initialAnswer);
    }

    /// @notice Publishes `answer` (positive, with `decimals` decimals) as a new round.
    function setPrice(int256 answer) external onlyOwner {
        _record(answer);
    }

    function description() external view override returns (string memory) {
        return _description;
    }

    function getRoundData(uint80 roundId)
        external
        view
        override
        returns (uint80, int256, uint256, uint256, uint80)
    {
        if (roundId == 0 || roundId > latestRound) revert RoundNotFound(roundId);
        return _roundData(roundId);
    }

    function latestRoundData()
        external
        view
        override
        returns (uint80, int256, uint256, uint256, uint80)
    {
        return _roundData(latestRound);
    }

    function _record(int256 answer) private {
        if (answer <= 0) revert NonPositiveAnswer(answer);
        uint80 roundId = latestRound + 1;
        latestRound = roundId;
        _rounds[roundId] = Round(answer, uint64(block.timestamp));
        emit NewRound(roundId, msg.sender, block.timestamp);
        emit AnswerUpdated(answer, roundId, block.timestamp);
    }

    function _roundData(uint80 roundId)
        private
        view
        returns (uint80, int256, uint256, uint256, uint80)
    {
        Round storage round = _rounds[roundId];
        return (roundId, round.answer, round.updatedAt, round.updatedAt, roundId);
    }
}
