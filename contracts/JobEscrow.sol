// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {Election} from "./Election.sol";
import {StakeRegistry} from "./StakeRegistry.sol";

/// @title JobEscrow
/// @notice Holds a requester's deposit for a training job, lets the job's elected master settle
/// it, pays fees and the refund at once and the contributors against a merkle root, as
/// docs/economics.md describes.
/// @dev Settlement costs the same whatever the number of contributors: they claim their own
/// leaves. The job's masters are the committee of the epoch the job was created in, ranked per job.
contract JobEscrow is ReentrancyGuard {
    using SafeERC20 for IERC20;

    enum Status {
        None,
        Open,
        Settled,
        Refunded
    }

    /// @dev Field order matches the Python `JobOnChain`; the narrow types pack it into 8 slots.
    struct Job {
        address requester;
        uint256 price;
        uint32 redundancy;
        uint64 maxCalculations;
        uint64 deadline;
        uint256 deposit;
        uint64 epoch;
        uint32 masterRank;
        uint64 lastHeartbeat;
        Status status;
        bytes32 root;
        uint256 payoutTotal;
        uint256 claimedTotal;
    }

    uint256 private constant MARGIN_PERCENT = 10;
    uint256 private constant MASTER_FEE_PERCENT = 5;
    uint256 private constant PARTNER_FEE_PERCENT = 3;

    IERC20 public immutable token;
    StakeRegistry public immutable registry;
    address public immutable treasury;
    /// @notice Seconds of master silence after which the next ranked master may take over.
    uint256 public immutable masterTimeout;

    mapping(bytes32 jobId => Job) private _jobs;
    mapping(bytes32 jobId => mapping(address account => bool)) private _claimed;

    event JobCreated(
        bytes32 indexed jobId,
        address indexed requester,
        uint256 price,
        uint256 redundancy,
        uint256 maxCalculations,
        uint256 deadline,
        uint256 deposit,
        uint256 epoch
    );
    event Heartbeat(bytes32 indexed jobId, address indexed master, uint256 timestamp);
    event MasterChanged(bytes32 indexed jobId, address indexed master, uint256 rank);
    event JobSettled(
        bytes32 indexed jobId,
        bytes32 root,
        uint256 acceptedResults,
        uint256 cost,
        uint256 masterFee,
        uint256 partnerTotal,
        uint256 protocolFee,
        uint256 refund
    );
    event Claimed(bytes32 indexed jobId, address indexed account, uint256 amount);
    event Refunded(bytes32 indexed jobId, address indexed requester, uint256 amount);

    error ZeroAddress(string parameter);
    error InvalidParameter(string parameter, uint256 value);
    error TokenMismatch(address token, address registryToken);
    /// @notice Raised by the registry's `elect()` when a job would open an epoch with no
    /// candidate at the minimum master stake; declared here so the escrow's ABI decodes it.
    error NoEligibleCandidates(uint256 epoch);
    error ZeroJobId();
    error JobAlreadyExists(bytes32 job);
    error DeadlineNotInFuture(uint256 deadline, uint256 timestamp);
    error ZeroPrice();
    error ZeroRedundancy();
    error ZeroMaxCalculations();
    error DepositBelowMaxCost(uint256 deposit, uint256 maxCost);
    error UnknownJob(bytes32 job);
    error JobNotOpen(bytes32 job, Status status);
    error JobNotSettled(bytes32 job, Status status);
    error JobDeadlinePassed(bytes32 job, uint256 deadline);
    error DeadlineNotPassed(bytes32 job, uint256 deadline);
    error NotJobMaster(bytes32 job, address caller);
    error NotJobCommitteeMember(bytes32 job, address caller);
    error RankNotAfterMaster(bytes32 job, uint256 rank, uint256 masterRank);
    error TakeOverTooEarly(bytes32 job, uint256 allowedAt);
    error TooManyResults(bytes32 job, uint256 acceptedResults, uint256 maxResults);
    error PartnerTotalTooHigh(bytes32 job, uint256 partnerTotal, uint256 maxPartnerTotal);
    error EmptyRoot(bytes32 job);
    error AlreadyClaimed(bytes32 job, address account);
    error InvalidProof(bytes32 job, address account, uint256 amount);
    error ClaimExceedsPayout(bytes32 job, uint256 amount, uint256 remaining);
    error MasterStakeTooLow(address master, uint256 active, uint256 minimum);

    constructor(IERC20 token_, StakeRegistry registry_, address treasury_, uint256 masterTimeout_) {
        if (address(token_) == address(0)) revert ZeroAddress("token");
        if (address(registry_) == address(0)) revert ZeroAddress("registry");
        if (treasury_ == address(0)) revert ZeroAddress("treasury");
        if (masterTimeout_ == 0) revert InvalidParameter("masterTimeout", masterTimeout_);
        address registryToken = address(registry_.token());
        if (registryToken != address(token_)) revert TokenMismatch(address(token_), registryToken);
        token = token_;
        registry = registry_;
        treasury = treasury_;
        masterTimeout = masterTimeout_;
    }

    // ------------------------------------------------------------- creation

    /// @notice Opens job `jobId` with the caller's `deposit` (approved beforehand).
    /// @dev The deposit must cover the job's maximum cost plus the margin; the job belongs to the
    /// current epoch, whose committee is elected here if nobody has elected it yet.
    function createJob(
        bytes32 jobId,
        uint256 price,
        uint32 redundancy,
        uint64 maxCalculations,
        uint64 deadline,
        uint256 deposit
    ) external nonReentrant {
        _createJob(jobId, price, redundancy, maxCalculations, deadline, deposit);
    }

    /// @notice `createJob` with an EIP-2612 permit for the deposit instead of a prior `approve`.
    /// @dev A failing permit is ignored (it may have been front-run); the transfer then needs the
    /// allowance to be there already.
    function createJobWithPermit(
        bytes32 jobId,
        uint256 price,
        uint32 redundancy,
        uint64 maxCalculations,
        uint64 deadline,
        uint256 deposit,
        uint256 permitDeadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external nonReentrant {
        try IERC20Permit(address(token)).permit(
            msg.sender, address(this), deposit, permitDeadline, v, r, s
        ) {} catch {}
        _createJob(jobId, price, redundancy, maxCalculations, deadline, deposit);
    }

    /// @notice The deposit a job needs at least: `c + c * 10 / 100`, `c` its full cost.
    function maxCost(uint256 price, uint256 redundancy, uint256 maxCalculations)
        public
        pure
        returns (uint256)
    {
        uint256 c = maxCalculations * redundancy * price;
        return c + c * MARGIN_PERCENT / 100;
    }

    // ---------------------------------------------------------------- masters

    /// @notice The current master shows it is alive, pushing back any take-over.
    function heartbeat(bytes32 jobId) external {
        Job storage job = _openJob(jobId);
        _requireMaster(jobId, job);
        job.lastHeartbeat = uint64(block.timestamp);
        emit Heartbeat(jobId, msg.sender, block.timestamp);
    }

    /// @notice A lower-ranked master takes the job over from a silent one.
    /// @dev Rank `r` may take over from rank `c < r` once `(r - c) * masterTimeout` seconds have
    /// passed since the last heartbeat. The take-over counts as the new master's first heartbeat.
    function takeOver(bytes32 jobId) external {
        Job storage job = _openJob(jobId);
        (bool found, uint256 rank) =
            Election.rankOf(jobId, registry.committee(job.epoch), msg.sender);
        if (!found) revert NotJobCommitteeMember(jobId, msg.sender);
        _requireMasterStake(msg.sender);
        uint256 current = job.masterRank;
        if (rank <= current) revert RankNotAfterMaster(jobId, rank, current);
        uint256 allowedAt = job.lastHeartbeat + (rank - current) * masterTimeout;
        if (block.timestamp < allowedAt) revert TakeOverTooEarly(jobId, allowedAt);
        // rank < committee length <= 256
        job.masterRank = uint32(rank);
        job.lastHeartbeat = uint64(block.timestamp);
        emit MasterChanged(jobId, msg.sender, rank);
    }

    /// @notice The job's current master: the committee member at the job's master rank.
    function masterOf(bytes32 jobId) external view returns (address) {
        Job storage job = _existingJob(jobId);
        return Election.rankMasters(jobId, registry.committee(job.epoch))[job.masterRank];
    }

    /// @notice The job's masters in rank order; index 0 is the first master.
    function rankedMasters(bytes32 jobId) external view returns (address[] memory) {
        Job storage job = _existingJob(jobId);
        return Election.rankMasters(jobId, registry.committee(job.epoch));
    }

    // ------------------------------------------------------------- settlement

    /// @notice The current master settles the job: fees and refund are paid at once, the
    /// contributors' `acceptedResults * price + partnerTotal` becomes claimable against `root`.
    function settle(bytes32 jobId, bytes32 root, uint256 acceptedResults, uint256 partnerTotal)
        external
        nonReentrant
    {
        Job storage job = _openJob(jobId);
        _requireMaster(jobId, job);
        uint256 maxResults = uint256(job.maxCalculations) * job.redundancy;
        if (acceptedResults > maxResults) revert TooManyResults(jobId, acceptedResults, maxResults);
        uint256 cost = acceptedResults * job.price;
        uint256 maxPartnerTotal = cost * PARTNER_FEE_PERCENT / 100;
        if (partnerTotal > maxPartnerTotal) {
            revert PartnerTotalTooHigh(jobId, partnerTotal, maxPartnerTotal);
        }
        uint256 payoutTotal = cost + partnerTotal;
        if (payoutTotal > 0 && root == bytes32(0)) revert EmptyRoot(jobId);
        uint256 margin = cost * MARGIN_PERCENT / 100;
        uint256 masterFee = cost * MASTER_FEE_PERCENT / 100;
        uint256 protocolFee = margin - masterFee - partnerTotal;
        uint256 refundAmount = job.deposit - cost - margin;
        job.status = Status.Settled;
        job.root = root;
        job.payoutTotal = payoutTotal;
        emit JobSettled(
            jobId, root, acceptedResults, cost, masterFee, partnerTotal, protocolFee, refundAmount
        );
        if (masterFee > 0) token.safeTransfer(msg.sender, masterFee);
        if (protocolFee > 0) token.safeTransfer(treasury, protocolFee);
        if (refundAmount > 0) token.safeTransfer(job.requester, refundAmount);
    }

    /// @notice Pays `account` its leaf of a settled job's payout tree; anyone may submit it.
    /// @dev The leaf is `keccak256(bytes.concat(keccak256(abi.encode(account, amount))))`.
    function claim(bytes32 jobId, address account, uint256 amount, bytes32[] calldata proof)
        external
        nonReentrant
    {
        Job storage job = _existingJob(jobId);
        if (job.status != Status.Settled) revert JobNotSettled(jobId, job.status);
        if (_claimed[jobId][account]) revert AlreadyClaimed(jobId, account);
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, amount))));
        if (!MerkleProof.verifyCalldata(proof, job.root, leaf)) {
            revert InvalidProof(jobId, account, amount);
        }
        uint256 remaining = job.payoutTotal - job.claimedTotal;
        if (amount > remaining) revert ClaimExceedsPayout(jobId, amount, remaining);
        _claimed[jobId][account] = true;
        job.claimedTotal += amount;
        emit Claimed(jobId, account, amount);
        if (amount > 0) token.safeTransfer(account, amount);
    }

    /// @notice Returns the whole deposit of an unsettled job to its requester after the deadline.
    function refund(bytes32 jobId) external nonReentrant {
        Job storage job = _existingJob(jobId);
        if (job.status != Status.Open) revert JobNotOpen(jobId, job.status);
        if (block.timestamp <= job.deadline) revert DeadlineNotPassed(jobId, job.deadline);
        job.status = Status.Refunded;
        emit Refunded(jobId, job.requester, job.deposit);
        token.safeTransfer(job.requester, job.deposit);
    }

    // ------------------------------------------------------------------ views

    /// @notice The job as stored; an unknown id gives an all-zero job (status None).
    function getJob(bytes32 jobId) external view returns (Job memory) {
        return _jobs[jobId];
    }

    function hasClaimed(bytes32 jobId, address account) external view returns (bool) {
        return _claimed[jobId][account];
    }

    // --------------------------------------------------------------- internal

    function _createJob(
        bytes32 jobId,
        uint256 price,
        uint32 redundancy,
        uint64 maxCalculations,
        uint64 deadline,
        uint256 deposit
    ) private {
        if (jobId == bytes32(0)) revert ZeroJobId();
        Job storage job = _jobs[jobId];
        if (job.status != Status.None) revert JobAlreadyExists(jobId);
        if (deadline <= block.timestamp) revert DeadlineNotInFuture(deadline, block.timestamp);
        if (price == 0) revert ZeroPrice();
        if (redundancy == 0) revert ZeroRedundancy();
        if (maxCalculations == 0) revert ZeroMaxCalculations();
        uint256 needed = maxCost(price, redundancy, maxCalculations);
        if (deposit < needed) revert DepositBelowMaxCost(deposit, needed);
        uint256 epoch = registry.currentEpoch();
        if (!registry.isElected(epoch)) registry.elect();
        job.requester = msg.sender;
        job.price = price;
        job.redundancy = redundancy;
        job.maxCalculations = maxCalculations;
        job.deadline = deadline;
        job.deposit = deposit;
        // Epochs count from a block timestamp, so they always fit in 64 bits.
        job.epoch = uint64(epoch);
        job.lastHeartbeat = uint64(block.timestamp);
        job.status = Status.Open;
        emit JobCreated(
            jobId, msg.sender, price, redundancy, maxCalculations, deadline, deposit, epoch
        );
        token.safeTransferFrom(msg.sender, address(this), deposit);
    }

    function _existingJob(bytes32 jobId) private view returns (Job storage job) {
        job = _jobs[jobId];
        if (job.status == Status.None) revert UnknownJob(jobId);
    }

    /// @dev An open job whose deadline has not passed: the only state masters act in.
    function _openJob(bytes32 jobId) private view returns (Job storage job) {
        job = _existingJob(jobId);
        if (job.status != Status.Open) revert JobNotOpen(jobId, job.status);
        if (block.timestamp > job.deadline) revert JobDeadlinePassed(jobId, job.deadline);
    }

    function _requireMaster(bytes32 jobId, Job storage job) private view {
        (bool found, uint256 rank) =
            Election.rankOf(jobId, registry.committee(job.epoch), msg.sender);
        if (!found || rank != job.masterRank) revert NotJobMaster(jobId, msg.sender);
        _requireMasterStake(msg.sender);
    }

    /// @dev A master acts only while it keeps the stake that made it a candidate: one that
    /// unbonded or was slashed below the minimum can neither heartbeat, take over nor settle.
    function _requireMasterStake(address master) private view {
        (uint256 active,,) = registry.stakeOf(master);
        uint256 minimum = registry.minMasterStake();
        if (active < minimum) revert MasterStakeTooLow(master, active, minimum);
    }
}
